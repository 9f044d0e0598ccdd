"""Property tests of the parsers that read user files: whatever a manifest (CSV or Parquet),
a HAM10000 metadata file or a TOML config holds, the result is a Dataset or a config, or a
one-line :class:`AuditError`; never another exception. A Dataset that comes back keeps the
Manifest's promises."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audit.config import build_config
from audit.data import load_dataset
from audit.data.ham10000 import METADATA_FILE
from audit.errors import AuditError

# 60 examples per property in CI; PROPERTY_EXAMPLES=1000 for a longer hunt
SETTINGS = settings(
    max_examples=int(os.environ.get("PROPERTY_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Cell values a user's spreadsheet can hold: names, numbers, blanks, "nan", paths that escape,
# odd unicode, very long strings.
CELLS = st.one_of(
    st.sampled_from(["", " ", "nan", "NaN", "None", "df", "nv", "mel", "0", "1", "-1", "2.5", "../escape.jpg"]),
    st.sampled_from(["img.jpg", "sub/img.png", "/etc/passwd", "é.jpg", "a" * 300, "x,y", 'q"uote', "\t"]),
    st.text(max_size=20),
    st.integers(-5, 10).map(str),
)
COLUMNS = st.sampled_from(
    ["path", "label", "label_name", "image_id", "mask_path", "group", "box_x0", "box_y1", "age", "site"]
)


@st.composite
def tables(draw) -> pd.DataFrame:
    columns = draw(st.lists(COLUMNS, min_size=0, max_size=6, unique=True))
    rows = draw(st.integers(0, 6))
    return pd.DataFrame({c: [draw(CELLS) for _ in range(rows)] for c in columns})


def _assert_manifest_promises(dataset, listed: int) -> None:
    manifest = dataset.manifest
    assert not manifest.empty
    assert manifest["image_id"].is_unique
    assert all(value is None or (isinstance(value, str) and value.strip()) for value in manifest["mask_path"])
    root = dataset.root.resolve()
    assert all(Path(p).resolve().is_relative_to(root) for p in manifest["path"])
    assert manifest["label"].between(0, len(dataset.classes) - 1).all()
    assert len(manifest) + len(dataset.rejected) == listed


def _load_or_error(kind: str, path: Path):
    try:
        return load_dataset(kind, path)
    except AuditError as exc:
        assert str(exc) and "\n" not in str(exc).strip()
        return None


@SETTINGS
@given(tables())
def test_any_manifest_csv_gives_a_dataset_or_a_one_line_error(frame):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "manifest.csv"
        frame.to_csv(path, index=False)
        dataset = _load_or_error("manifest", path)
        if dataset is not None:  # a cell holding a line break is two rows of the file
            _assert_manifest_promises(dataset, len(pd.read_csv(path, dtype=str, keep_default_na=False)))


@SETTINGS
@given(st.binary(max_size=200))
def test_any_bytes_as_a_manifest_csv_give_a_dataset_or_a_one_line_error(data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "manifest.csv"
        path.write_bytes(data)
        _load_or_error("manifest", path)


PARQUET_CELLS = st.one_of(st.none(), st.integers(-3, 9), st.floats(allow_nan=True, allow_infinity=True), CELLS)


@SETTINGS
@given(st.data())
def test_any_manifest_parquet_gives_a_dataset_or_a_one_line_error(data):
    columns = data.draw(st.lists(COLUMNS, min_size=1, max_size=6, unique=True))
    rows = data.draw(st.integers(0, 6))
    kinds = {c: data.draw(st.sampled_from(["int", "float", "str", "mixed"])) for c in columns}
    values = {}
    for column, kind in kinds.items():
        cell = {
            "int": st.integers(-3, 9),
            "float": st.floats(allow_nan=True, allow_infinity=True),
            "str": CELLS,
            "mixed": PARQUET_CELLS.map(lambda v: None if v is None else str(v)),
        }[kind]
        values[column] = [data.draw(cell) for _ in range(rows)]
    frame = pd.DataFrame(values)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "manifest.parquet"
        frame.to_parquet(path, index=False)
        dataset = _load_or_error("manifest", path)
        if dataset is not None:
            _assert_manifest_promises(dataset, len(frame))


HAM_COLUMNS = st.sampled_from(["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "other"])


@SETTINGS
@given(st.data())
def test_any_ham10000_metadata_gives_a_dataset_or_a_one_line_error(data):
    columns = data.draw(st.lists(HAM_COLUMNS, min_size=0, max_size=8, unique=True))
    rows = data.draw(st.integers(0, 5))
    frame = pd.DataFrame({c: [data.draw(CELLS) for _ in range(rows)] for c in columns})
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "HAM10000_images_part_1").mkdir()
        frame.to_csv(root / METADATA_FILE, index=False)
        dataset = _load_or_error("ham10000", root)
        if dataset is not None:
            _assert_manifest_promises(dataset, len(pd.read_csv(root / METADATA_FILE, dtype=str, keep_default_na=False)))


CONFIG_KEYS = st.sampled_from(
    ["dataset", "checkpoint", "data_dir", "batch_size", "limit", "targets", "masks", "evidence", "sanity_images",
     "grid", "topk", "delta", "keep", "report", "gallery", "fail_on", "tolerance", "name", "unknown_key"]
)  # fmt: skip
TOML_VALUES = st.recursive(
    st.one_of(
        st.booleans(),
        st.integers(-(2**40), 2**40),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12),
        st.sampled_from(["ham10000", "manifest", "pred", "both", "auto", "all", "none", "warn", "model.pt"]),
    ),
    lambda children: st.lists(children, max_size=3),
    max_leaves=4,
)


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    return "[" + ", ".join(_toml(v) for v in value) + "]"


@SETTINGS
@given(
    st.dictionaries(CONFIG_KEYS, TOML_VALUES, max_size=8),
    st.dictionaries(st.sampled_from(["off_object_fail", "min_rows", "bootstrap", "nonsense"]), TOML_VALUES, max_size=3),
)
def test_any_toml_config_gives_a_config_or_a_one_line_error(options, thresholds):
    lines = [f"{key} = {_toml(value)}" for key, value in options.items()]
    if thresholds:
        lines += ["[thresholds]", *(f"{key} = {_toml(value)}" for key, value in thresholds.items())]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "job.toml"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        try:
            config = build_config(path, {})
        except AuditError as exc:
            assert str(exc) and "\n" not in str(exc).strip()
            return
        assert config.dataset in ("ham10000", "imagefolder", "manifest", "synthetic") and config.checkpoint


@SETTINGS
@given(st.binary(max_size=120))
def test_any_bytes_as_a_toml_config_give_a_config_or_a_one_line_error(data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "job.toml"
        path.write_bytes(data)
        with pytest.raises(AuditError):  # no required option can come out of random bytes and survive
            build_config(path, {})


def test_the_generators_reach_the_success_path():
    """Not only errors: a plain manifest through the same checks gives a Dataset."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "manifest.csv"
        pd.DataFrame({"path": ["a.jpg", "b.jpg"], "label_name": ["df", "nv"], "mask_path": ["", np.nan]}).to_csv(
            path, index=False
        )
        _assert_manifest_promises(load_dataset("manifest", path), 2)
