"""The family spec passes the kernel's own genetlink-legacy schema, as the kernel's YNL tools check it.

The schema is the kernel's ``Documentation/netlink/genetlink-legacy.yaml``,
provided unchanged beside the project at ``../shared/ynl/`` (not copied in).
Its absence is a failure, not a skip: this check is part of the contract.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import yaml

from kmlbus.contract import spec
from kmlbus.wire import codec

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT.parent / "shared" / "ynl" / "genetlink-legacy.yaml"


def schema() -> dict[str, Any]:
    if not SCHEMA.is_file():
        pytest.fail(f"{SCHEMA} is missing: the kernel's genetlink-legacy schema must be beside the "
                    "project at ../shared/ynl/ (Documentation/netlink/genetlink-legacy.yaml, unchanged)")
    raw = yaml.safe_load(SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(raw)
    assert isinstance(raw, dict)
    return raw


def errors(doc: Any) -> list[str]:
    v = jsonschema.Draft7Validator(schema())
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in sorted(v.iter_errors(doc), key=lambda e: list(e.absolute_path))]


def test_the_family_spec_validates_against_the_kernels_genetlink_legacy_schema() -> None:
    raw = yaml.safe_load(spec.spec_path().read_text(encoding="utf-8"))
    found = errors(raw)
    assert not found, "\n".join(found)


@pytest.mark.parametrize("extra", [{"enum-as-flags": True}, {"sub-type": "s32"}])
def test_the_schema_refuses_the_keys_the_spec_used_to_carry(extra: dict[str, Any]) -> None:
    """The check can fail: the two struct-member keys of issue 13 are rejected."""
    raw = yaml.safe_load(spec.spec_path().read_text(encoding="utf-8"))
    sample = next(d for d in raw["definitions"] if d["name"] == "sample")
    sample["members"][-1].update(extra)
    assert any(next(iter(extra)) in e for e in errors(raw))


def test_features_are_an_array_of_max_features_s32_for_kmlbus_and_a_struct_for_ynl() -> None:
    sp = spec.load()
    (m,) = [m for m in sp.structs["sample"].members if m.name == "features"]
    assert (m.struct, m.sub_type, m.count) == ("features", "s32", sp.consts["max-features"])
    assert len(sp.structs["features"].members) == sp.consts["max-features"]
    assert "features" in sp.array_structs
    dt = codec.struct_dtype("sample")
    assert dt["features"].shape == (sp.consts["max-features"],) and dt["features"].base == np.dtype("<i4")


def test_a_struct_member_that_is_not_an_array_of_one_type_is_refused(tmp_path: Path) -> None:
    raw = yaml.safe_load(spec.spec_path().read_text(encoding="utf-8"))
    feats = next(d for d in raw["definitions"] if d["name"] == "features")
    feats["members"][0]["type"] = "u32"
    p = tmp_path / "kmlbus.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(spec.SpecError, match=r"struct sample.features: expected a binary member naming "
                                              r"a struct of one scalar type"):
        spec._parse(raw, p)
    feats["members"][0]["type"] = "s32"
    sample = next(d for d in raw["definitions"] if d["name"] == "sample")
    sample["members"][-1]["len"] = 28
    with pytest.raises(spec.SpecError, match="len 28 differs from the 32 bytes of struct features"):
        spec._parse(raw, p)
