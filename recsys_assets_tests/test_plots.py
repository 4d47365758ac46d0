"""The pictures in asset metadata: training curves, the metrics bar chart, inline markdown, MLflow artifacts."""

import base64
import struct
import subprocess
import sys

from recsys_assets.evaluation.plots import image_markdown, metrics_bar_chart_png, training_curves_png

HISTORY = [  # the shape of TwoTowerTrainResult.history
    {
        "epoch": e,
        "loss": 5.0 - e,
        "metrics": {"hr@10": 0.1 + 0.05 * e, "ndcg@10": 0.05 + 0.03 * e, "hr@100": 0.5},
        "samples": 100,
        "steps": 4,
        "train_seconds": 1.0,
        "eval_seconds": 0.1,
    }
    for e in range(4)
]


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_training_curves_and_markdown(tmp_path):
    png = training_curves_png(HISTORY, tmp_path / "sub" / "curves.png", title="two_tower (validation)")
    w, h = _png_size(png)
    assert (w, h) == (600, 350)
    assert png.stat().st_size < 150_000
    md = image_markdown(png, alt="curves")
    assert md.startswith("![curves](data:image/png;base64,") and md.endswith(")")
    assert base64.b64decode(md[len("![curves](data:image/png;base64,") : -1]) == png.read_bytes()


def test_training_curves_tolerates_empty_and_flat_metrics(tmp_path):
    _png_size(training_curves_png([], tmp_path / "empty.png"))
    _png_size(training_curves_png([{"epoch": 0, "loss": 1.0, "hr@10": 0.2, "ndcg@10": 0.1}], tmp_path / "one.png"))


def test_metrics_bar_chart(tmp_path):
    rows = {
        "two_tower": {"hr@10": 0.3, "ndcg@10": 0.15},
        "MostPopular": {"hr@10": 0.1, "ndcg@10": 0.05},
        "EASE": {"hr@10": 0.25},
    }
    assert _png_size(metrics_bar_chart_png(rows, tmp_path / "bars.png")) == (600, 350)


def test_no_pyplot_state():
    """The module never imports pyplot (no global figures, no GUI backend)."""
    code = (
        "import sys, tempfile, os; from recsys_assets.evaluation import plots; d = tempfile.mkdtemp(); "
        "plots.training_curves_png([{'epoch': 0, 'loss': 1.0}], os.path.join(d, 'a.png')); "
        "plots.metrics_bar_chart_png({'m': {'hr@10': 0.1}}, os.path.join(d, 'b.png')); "
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_training_curves_png_is_an_mlflow_artifact(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("plots", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    png = training_curves_png(HISTORY, tmp_path / "training_curves.png")
    client.log_artifact(run_id, str(png), artifact_path="plots")
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/training_curves.png"]
