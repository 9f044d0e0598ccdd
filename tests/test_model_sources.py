"""Model specs: cam-audit checkpoints, timm:NAME, torchvision:NAME and the team's own module, with
--weights, --classes and the model's own preprocessing; `audit model inspect`; and audits of a timm
ViT and of a team's module end to end (the module shipped to Ray workers that lack it)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

from audit.cli import main
from audit.errors import CheckpointError
from audit.models.checkpoint import load_model, save_random_checkpoint
from audit.models.source import ModelRequest, module_root, parse_classes, resolve_model, spec_kind
from audit.pipeline.run import OUTPUT_DIR
from tests.test_bad_input import assert_bad_input

CLASSES = ("akiec", "bcc", "mel")
TEAM_MODULE = '''
import torch
from torch import nn


class SkinNet(nn.Module):
    """conv -> ReLU -> mean over H and W -> linear: the team's own classifier, CAM-ready."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1))
        self.classify = nn.Linear(16, 3)

    def forward(self, x):
        return self.classify(self.body(x).mean(dim=(2, 3)))


def build():
    torch.manual_seed(7)
    return SkinNet()


def not_a_model():
    return "a string"
'''


LOG_WHERE_BUILT = """

_plain_build = build


def build():
    with open({log!r}, "a") as log:
        log.write(__file__ + "\\n")
    return _plain_build()
"""


def invoke(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="audit")


@pytest.fixture
def team_package(tmp_path, monkeypatch):
    """``teamnet.models:build`` importable from tmp_path (as from the current directory)."""
    package = tmp_path / "teamnet"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(textwrap.dedent(TEAM_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m == "teamnet" or m.startswith("teamnet.")]:
        del sys.modules[name]


def test_spec_kinds(tmp_path):
    assert spec_kind("timm:efficientnet_b0") == "timm" and spec_kind("torchvision:vit_b_16") == "torchvision"
    assert spec_kind("teamnet.models:build") == "module" and spec_kind("models/resnet50.pt") == "checkpoint"
    odd = tmp_path / "a:b"
    odd.write_bytes(b"")
    assert spec_kind(str(odd)) == "checkpoint"  # an existing file wins over the module form


def test_classes_from_a_comma_list_or_a_file(tmp_path):
    assert parse_classes("akiec, bcc,mel") == CLASSES
    names = tmp_path / "classes.txt"
    names.write_text("akiec\nbcc\n\nmel\n")
    assert parse_classes(str(names)) == CLASSES
    with pytest.raises(CheckpointError, match="duplicate"):
        parse_classes("a,b,a")


def test_timm_weights_from_safetensors_or_a_torch_file_give_the_saved_model(tmp_path):
    request = ModelRequest("timm:resnet18", classes=CLASSES, input_size=(64, 64))
    torch.manual_seed(3)
    original = resolve_model(request).model
    with torch.no_grad():
        for parameter in original.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)  # not the seed-0 init
    state = {k: v.contiguous() for k, v in original.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "w.pth")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = original.eval()(images)
    for weights in ("w.safetensors", "w.pth"):
        resolved = resolve_model(ModelRequest("timm:resnet18", weights=str(tmp_path / weights), classes=CLASSES))
        with torch.no_grad():
            assert torch.allclose(resolved.model(images), expected, atol=1e-5)
        assert resolved.info()["sha256"] != resolve_model(request).sha256
        rebuilt = load_model(resolved.checkpoint)  # what a Ray worker does with the shipped bytes
        with torch.no_grad():
            assert torch.allclose(rebuilt(images), expected, atol=1e-5)


def test_random_weights_are_the_same_in_every_resolution():
    request = ModelRequest("torchvision:resnet18", classes=CLASSES)
    assert resolve_model(request).sha256 == resolve_model(request).sha256


def test_preprocessing_comes_from_the_model_unless_given():
    vit = resolve_model(ModelRequest("timm:vit_tiny_patch16_224", classes=CLASSES)).checkpoint
    assert vit.input_size == (224, 224) and vit.mean == (0.5, 0.5, 0.5) and vit.std == (0.5, 0.5, 0.5)
    tv = resolve_model(ModelRequest("torchvision:inception_v3", classes=CLASSES)).checkpoint
    assert tv.input_size == (299, 299) and tv.mean == pytest.approx((0.485, 0.456, 0.406))
    given = ModelRequest("timm:vit_tiny_patch16_224", classes=CLASSES, input_size=(64, 64), mean=(0.1,) * 3)
    small = resolve_model(given).checkpoint
    assert small.input_size == (64, 64) and small.mean == (0.1,) * 3 and small.std == (0.5, 0.5, 0.5)


def test_the_teams_module_is_built_called_with_no_arguments(team_package):
    resolved = resolve_model(ModelRequest("teamnet.models:build", classes=CLASSES))
    assert resolved.checkpoint.arch == "teamnet.models:build" and resolved.checkpoint.input_size == (224, 224)
    assert module_root("teamnet.models:build") == str(team_package / "teamnet")
    with pytest.raises(CheckpointError, match="returns 3 logits but 2 classes"):
        resolve_model(ModelRequest("teamnet.models:build", classes=("a", "b")))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("timm:resnet_18", "unknown timm model 'resnet_18'; did you mean"),
        ("torchvision:resnet5", "unknown architecture 'resnet5'"),
        ("teamnet.nowhere:build", "cannot import 'teamnet.nowhere'"),
        ("teamnet.models:missing", "has no 'missing'"),
        ("teamnet.models:not_a_model", "returned a str, not a torch nn.Module"),
        ("no/such/model.pt", "checkpoint not found"),
    ],
)
def test_a_bad_spec_is_one_line_and_exit_2_in_every_command(team_package, tmp_path, spec, message):
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    assert_bad_input(invoke("model", "inspect", spec), message)
    assert_bad_input(invoke("explain", image, "--model", spec, "--out", tmp_path / "o"), message)
    assert_bad_input(
        invoke("run", "--dataset", "synthetic", "--data-dir", tmp_path / "d", "--model", spec, "--out", tmp_path),
        message,
    )
    assert not (tmp_path / "o").exists()


def test_weights_that_do_not_fit_name_the_first_mismatching_keys(tmp_path):
    resnet = resolve_model(ModelRequest("timm:resnet18", classes=CLASSES)).model
    save_file({k: v.contiguous() for k, v in resnet.state_dict().items()}, tmp_path / "r18.safetensors")
    result = invoke(
        "model", "inspect", "timm:resnet34", "--weights", tmp_path / "r18.safetensors", "--classes", "a,b,c"
    )
    assert_bad_input(result, "does not fit timm:resnet34: 96 missing (e.g. layer1.2.conv1.weight)")
    result = invoke("model", "inspect", "timm:resnet18", "--weights", tmp_path / "r18.safetensors", "--classes", "a,b")
    assert_bad_input(result, "of another shape (e.g. fc.weight: 3x512 in the file, 2x512 in the model)")
    checkpoint = tmp_path / "model.pt"
    save_random_checkpoint(checkpoint, "resnet18", CLASSES, (64, 64))
    assert_bad_input(invoke("model", "inspect", checkpoint, "--classes", "a,b,c"), "--classes complete a timm:")


@pytest.mark.parametrize(
    ("spec", "options", "expected"),
    [
        ("timm:vit_tiny_patch16_224", ["--input-size", "64"], ("blocks.11.norm1", "tokens", [4, 4], 192, False)),
        ("timm:swin_tiny_patch4_window7_224", [], ("norm", "nhwc", [7, 7], 768, True)),
        ("torchvision:vit_b_32", [], ("encoder.layers.encoder_layer_11.ln_1", "tokens", [7, 7], 768, False)),
        ("timm:efficientnet_b0", ["--input-size", "64,64"], ("bn2", "nchw", [2, 2], 1280, True)),
        ("torchvision:resnet18", ["--input-size", "64"], ("layer4", "nchw", [2, 2], 512, True)),
    ],
)
def test_model_inspect_says_where_and_how_an_audit_explains(spec, options, expected):
    result = invoke("model", "inspect", spec, "--classes", "a,b,c", *options, "--json")
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert (found["target_layer"], found["layout"], found["grid"], found["channels"], found["cam"]) == expected
    assert (found["cam_note"] is None) == found["cam"] and found["candidates"] and found["classes"] == 3
    text = invoke("model", "inspect", spec, "--classes", "a,b,c", *options).stdout
    assert f"target layer  {expected[0]}" in text and "other layers (--target-layer):" in text


def test_inspect_refuses_a_layer_after_a_class_token_readout_and_points_at_a_good_one():
    result = invoke("model", "inspect", "timm:vit_tiny_patch16_224", "--input-size", "64", "--target-layer", "norm")
    assert_bad_input(result, "gets no gradient from the class score at its spatial positions")
    assert "the automatic choice is 'blocks.11.norm1'" in result.stderr


def _manifest(root: Path, n: int = 6) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        path = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
        rows.append({"image_id": f"img{i}", "path": path.name, "label_name": CLASSES[i % 3]})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


def _ok_rows(run_dir: Path) -> pd.DataFrame:
    rows = pd.concat([pd.read_parquet(f) for f in (run_dir / OUTPUT_DIR).glob("*.parquet")], ignore_index=True)
    assert (rows["status"] == "ok").all(), rows[["status", "error"]]
    return rows


@pytest.mark.slow
def test_a_timm_vit_with_safetensors_weights_is_audited_end_to_end(ray_session, tmp_path):
    spec = "timm:vit_small_patch16_224"
    model = resolve_model(ModelRequest(spec, classes=CLASSES)).model
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "vit.safetensors")
    from audit.config import RunConfig
    from audit.pipeline.run import Execution, run_audit

    config = RunConfig(
        dataset="manifest",
        data_dir=str(_manifest(tmp_path)),
        model=spec,
        weights=str(tmp_path / "vit.safetensors"),
        classes=list(CLASSES),
        out=str(tmp_path / "runs"),
        evidence="none",
        sanity_images=0,  # the cascade on a ViT: test_randomization_cascade_of_a_vit
        batch_size=3,
    )
    run_dir = run_audit(config, Execution(progress=False))
    rows = _ok_rows(run_dir)
    assert len(rows) == 6
    for method in ("gradcam", "gradcampp"):
        maps = np.stack([np.asarray(m, dtype=np.float32).reshape(14, 14) for m in rows[f"map_{method}"]])
        assert (maps.reshape(6, -1).max(axis=1) > 0).all()  # none all zero
    assert rows["map_cam"].isna().all()  # a class-token readout has no CAM
    info = json.loads((run_dir / "run.json").read_text())["model"]
    assert (info["spec"], info["layout"], info["feature_shape"]) == (spec, "tokens", [384, 14, 14])
    assert info["target_layer"] == "blocks.11.norm1" and info["classes"] == list(CLASSES)
    assert info["mean"] == [0.5, 0.5, 0.5] and len(info["sha256"]) == 64


def test_randomization_cascade_of_a_vit_goes_from_the_head_through_the_last_block_to_the_one_before():
    from audit.models.anatomy import randomization_cascade

    model = resolve_model(ModelRequest("timm:vit_tiny_patch16_224", classes=CLASSES, input_size=(64, 64))).model
    steps = randomization_cascade(model, (64, 64), "blocks.11.norm1")
    assert steps[0][-1] == "head" and "blocks.11.attn.qkv" in steps[0] and "blocks.11.norm1" not in steps[0]
    assert steps[1][-1] == "blocks.11.norm1" and steps[2][-1] == "blocks.10" and len(steps) == 3


@pytest.mark.slow
def test_a_teams_module_reaches_ray_workers_started_without_it(ray_head, team_package, tmp_path):
    """The head's workers were started without teamnet: the job ships it (runtime_env py_modules),
    and the workers build the model from that copy, as the log of where `build` ran from shows."""
    (team_package / "teamnet" / "models.py").write_text(
        textwrap.dedent(TEAM_MODULE) + LOG_WHERE_BUILT.format(log=str(tmp_path / "built_from.txt"))
    )
    (tmp_path / "data").mkdir()
    manifest = _manifest(tmp_path / "data")
    env = {**ray_head, "PYTHONPATH": str(team_package)}
    env.pop("RAY_ADDRESS")  # the job server's; `audit run --address` joins the cluster itself
    command = [
        str(Path(sys.executable).parent / "audit"),
        "run",
        "--dataset",
        "manifest",
        "--data-dir",
        str(manifest),
        "--model",
        "teamnet.models:build",
        "--input-size",
        "32",
        "--address",
        ray_head["RAY_HEAD_GCS"],
        "--out",
        str(tmp_path / "runs"),
        "--evidence",
        "none",
        "--sanity-images",
        "2",
        "--no-report",
    ]
    # Ray hands the driver's current directory to every worker: run from one without teamnet
    done = subprocess.run(command, env=env, cwd=tmp_path / "data", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = Path(done.stdout.strip().splitlines()[-1])
    rows = _ok_rows(run_dir)
    assert len(rows) == 6 and rows["map_cam"].notna().all()  # CAM: the team's head is GAP -> linear
    info = json.loads((run_dir / "run.json").read_text())
    assert info["model"]["cam_head"] == "classify" and info["model"]["source"] == "module"
    assert "error" not in json.loads((run_dir / "sanity.json").read_text())
    built_from = set((tmp_path / "built_from.txt").read_text().split())
    assert str(team_package / "teamnet" / "models.py") in built_from  # the driver, from its PYTHONPATH
    shipped = [p for p in built_from if "runtime_resources" in p and "py_modules" in p]
    assert len(built_from) == 2 and shipped  # the workers, from the copy the job shipped


def test_train_takes_a_timm_arch_and_its_checkpoint_records_the_spec(tmp_path):
    from audit.data.synthetic import SyntheticSpec, generate
    from audit.models.checkpoint import load_checkpoint

    data = generate(tmp_path / "syn", SyntheticSpec(images=60, height=32, width=40, seed=4), workers=1)
    pretrained = resolve_model(ModelRequest("timm:resnet18", classes=tuple(f"c{i}" for i in range(1000)))).model
    save_file({k: v.contiguous() for k, v in pretrained.state_dict().items()}, tmp_path / "r18.safetensors")
    out = tmp_path / "model.pt"
    command = ["train", "--dataset", "synthetic", "--data-dir", data, "--arch", "timm:resnet18"]
    command += ["--image-size", "32", "--epochs", "1", "--batch-size", "16", "--out", out]
    assert_bad_input(invoke(*command), "come from the Hugging Face hub")  # --weights imagenet, the default
    result = invoke(*command, "--weights", tmp_path / "r18.safetensors")
    assert result.exit_code == 0, result.output
    checkpoint = load_checkpoint(out)
    assert checkpoint.arch == "timm:resnet18" and checkpoint.input_size == (32, 32)
    assert "r18.safetensors (" in result.stderr and "new classifier: fc.weight, fc.bias" in result.stderr
    inspected = json.loads(invoke("model", "inspect", out, "--json").stdout)  # audited as trained, at 32x32:
    assert inspected["target_layer"] == "layer3" and inspected["grid"] == [2, 2]  # layer4 is a single cell


def test_explain_takes_a_model_spec(tmp_path):
    image = tmp_path / "lesion.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(image)
    spec = ["--model", "timm:vit_tiny_patch16_224", "--input-size", "64", "--classes", ",".join(CLASSES)]
    result = invoke("explain", image, *spec, "--npy", "--out", tmp_path / "looks")
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in (tmp_path / "looks").iterdir())
    assert written == ["lesion.gradcam.npy", "lesion.gradcampp.npy", "lesion.png"]  # no CAM, no ReLU to guide
    assert np.load(tmp_path / "looks" / "lesion.gradcam.npy").shape == (64, 64)
