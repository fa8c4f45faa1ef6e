"""The stand-in carries its labels with the real task's difficulty: mask easy, age band hard."""

import warnings

import numpy as np
import pytest
from PIL import Image
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.preprocessing import StandardScaler

from maskcls.data.layout import scan
from maskcls.data.split import holdout


@pytest.mark.slow
def test_logistic_regression_learns_mask_well_and_age_band_clearly_worse(standin300):
    images = scan(standin300)
    pixels = np.stack(
        [
            np.asarray(Image.open(p).convert("RGB").resize((24, 32)), np.float32).ravel()
            for p in images["path"]
        ]
    )
    split = holdout(images, val_ratio=0.3, seed=0)
    scaler = StandardScaler().fit(pixels[split.train])
    x_train, x_val = scaler.transform(pixels[split.train]), scaler.transform(pixels[split.val])
    scores = {}
    for target in ("mask", "age_band"):
        y = images[target].to_numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = LogisticRegression(C=0.01, max_iter=200).fit(x_train, y[split.train])
        scores[target] = balanced_accuracy_score(y[split.val], model.predict(x_val))
    print(f"balanced accuracy on held-out people: {scores}")
    assert scores["mask"] > 0.6  # chance is 1/3
    assert scores["age_band"] < scores["mask"] - 0.1
