"""Images inside the Airflow UI: the "Images" tabs of DAG runs and task instances, and "Z-Image spend".

* `links`: the URLs of those tabs (imported by the operator's extra link on workers: no FastAPI here).
* `gallery`: reads a run's manifests into pages of cards, and maps a request to a file it computed.
* `thumbnails`: small JPEGs generated once and cached next to the images.
* `pages`: the HTML of the views.
* `app`: the FastAPI app the plugin mounts at `/zimage/ui`, behind Airflow's authentication and the
  auth manager's DAG permissions.

Needs Airflow >= 3.1 for the tabs (`external_views` with a `dag_run` / `task_instance` destination);
on 3.0 the routes still answer, the tabs are simply not drawn.
"""
