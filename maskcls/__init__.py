"""Train and use one face-mask status classifier (18 classes). Knows nothing of Optuna."""

import os

# OpenMP reads its wait policy once, when torch loads it, so it is set here, before any of our
# modules imports torch. Its default lets idle threads spin for a while, which on a machine busy
# with other work makes each step 10-50x slower; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
