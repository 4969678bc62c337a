"""nbval runs the course notebooks (`make test` collects this folder): small runs, quiet kernels.

Environment variables set here reach every notebook's kernel. KDLAB_PROFILE=ci scales each
notebook to about two minutes on a 2-core CPU (see kdlab/course/__init__.py); set it yourself to run the
notebooks at another size under pytest. MPLBACKEND is deliberately not set: Agg would also reach
the kernels and turn off inline figures, which would change the notebooks' stored outputs.
"""

import os

os.environ.setdefault("KDLAB_PROFILE", "ci")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collectstart(collector):
    # stderr carries warnings whose wording changes between library versions; it is never compared
    if collector.fspath and collector.fspath.ext == ".ipynb":
        collector.skip_compare += ("stderr",)
