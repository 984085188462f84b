"""The OpenAI images wire (`POST /v1/images/generations`), sans-IO: what SGLang Diffusion, vLLM-Omni and
the routers in front of them (an HTTP load balancer such as nginx, NVIDIA Dynamo) speak.

`wire` turns a validated Runware `imageInference` request into one OpenAI images body per image (n=1,
seed, seed+1, ...), refuses before sending what that API cannot express, reads the answers and
re-encodes the pixels into the requested format. No network, no Airflow, no storage: the hook
(`hooks/openai_images.py`) moves the bytes, the job (`jobs/openai_images.py`) records and stores.
"""
