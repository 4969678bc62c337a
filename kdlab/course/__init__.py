"""The course's one knob: a profile that scales every notebook's runs, same code path at every size.

    P = kdlab.course.profile()                 # KDLAB_PROFILE=ci|cpu|gpu|reference, else gpu if CUDA, else cpu
    cfg = P.config("04-curriculum/linear", w_feature=0.5, max_steps=P.steps)
    print(P)                                   # what was chosen, and why
    state = P.fit(kdlab.build_trainer(cfg, callbacks=[lp]), arm="all-terms")
    ref = kdlab.course.reference("all-terms")  # the committed long run of that arm: records, samples

`P.fit` trains, except under the `reference` profile, which trains nothing: it replays the committed
reference run of `arm` (notebooks/reference/<arm>/, written by scripts/reference_runs.py) through the
trainer's callbacks, so a participant whose machine is slow or broken follows every notebook with
the long run's curves. `KDLAB_CORPUS=<a text file or folder>` runs the course on your own corpus
instead of Austen (split 18/1/1 by documents, as `kdlab train --data` does).

`make test` sets KDLAB_PROFILE=ci, so each notebook runs in about two minutes on a 2-core CPU;
`make lab` leaves it unset, so a laptop gets "cpu" (a few minutes per notebook, clearer curves) and
a GPU machine "gpu" (longer runs at the default pair's full sequence length). Every profile trains
the real default pair: the SmolLM2-135M teacher and the 4-layer student initialised from it, on
the Austen corpus. Only sizes change: steps, batch, sequence length, evaluation batches.

Notebooks run with the notebook's folder as working directory, so paths are resolved against the
repository (the folder holding data/MANIFEST.json) and given relative to the working directory:
stored outputs then never hold a machine's absolute paths.
"""

from kdlab.course.profiles import CORPUS_VAR, COURSE_PAIR, ENV_VAR, PROFILES, Profile, describe_machine, profile, quiet
from kdlab.course.references import REFERENCE_DIR, Reference, reference, reference_before, repo_root

__all__ = [
    "ENV_VAR",
    "CORPUS_VAR",
    "COURSE_PAIR",
    "PROFILES",
    "REFERENCE_DIR",
    "Profile",
    "Reference",
    "describe_machine",
    "profile",
    "quiet",
    "reference",
    "reference_before",
    "repo_root",
]
