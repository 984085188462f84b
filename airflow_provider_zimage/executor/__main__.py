import sys

from airflow_provider_zimage.executor.cli import main

sys.exit(main())
