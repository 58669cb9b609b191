from __future__ import annotations

import json

import pytest

from cachefs.models import (
    CachedImageMetadata,
    ContainerConfig,
    ImageConfig,
    ImageConfigFile,
    ImageManifest,
    ValidationError,
    compact_json,
)

# FORMATS.md §2.5 (digests written out in full as msb wrote them).
CFG = "sha256:0a640da379359c26b09ff2e5cf22818df92cedfebfe11876890ebaed64c05de8"
LAYER = "sha256:788c0f16470a200e2ca25bba8711c3fdce49ae6dc2abd8d2edb8ca1c05093a06"
WH1 = (
    '{"manifest_digest":"sha256:4e580a2a3b6aecfc40906d6b5c2a5e13834e82248065dc9de87e88d41f647e9e",'
    f'"config_digest":"{CFG}",'
    '"raw_manifest_json":"{\\"config\\":{\\"digest\\":\\"' + CFG + '\\",\\"mediaType\\":'
    '\\"application/vnd.oci.image.config.v1+json\\",\\"size\\":173},\\"layers\\":[{\\"digest\\":'
    '\\"' + LAYER + '\\",\\"mediaType\\":\\"application/vnd.oci.image.layer.v1.tar\\",'
    '\\"size\\":10240}],\\"mediaType\\":\\"application/vnd.oci.image.manifest.v1+json\\",'
    '\\"schemaVersion\\":2}",'
    '"raw_config_json":"{\\"architecture\\": \\"amd64\\", \\"os\\": \\"linux\\", \\"config\\": {},'
    ' \\"rootfs\\": {\\"type\\": \\"layers\\", \\"diff_ids\\": [\\"' + LAYER + '\\"]}}",'
    '"config":{"env":[],"cmd":null,"entrypoint":null,"working_dir":null,"user":null,'
    '"exposed_ports":[],"volumes":[],"labels":{},"stop_signal":null},'
    f'"layers":[{{"digest":"{LAYER}","media_type":"application/vnd.oci.image.layer.v1.tar",'
    f'"size_bytes":10240,"diff_id":"{LAYER}"}}]}}'
).encode()


def test_msb_example_round_trips_byte_for_byte() -> None:
    meta = CachedImageMetadata.from_json_bytes(WH1)
    assert meta.to_json_bytes() == WH1
    assert str(meta.manifest) == meta.manifest_digest
    assert [str(d) for d in meta.diff_ids] == [LAYER]


def test_absent_optionals_are_tolerated_and_written_as_null() -> None:
    doc = json.loads(WH1)
    for key in ("cmd", "entrypoint", "working_dir", "user", "stop_signal"):
        del doc["config"][key]
    del doc["layers"][0]["media_type"]
    del doc["layers"][0]["size_bytes"]
    doc["unknown_extra"] = 1
    meta = CachedImageMetadata.from_json_bytes(compact_json(doc))
    out = json.loads(meta.to_json_bytes())
    assert out["config"]["cmd"] is None and out["layers"][0]["size_bytes"] is None
    assert "unknown_extra" not in out
    assert list(out) == [
        "manifest_digest", "config_digest", "raw_manifest_json", "raw_config_json", "config",
        "layers",
    ]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["config"].pop("env"),
        lambda d: d["config"].__setitem__("labels", None),
        lambda d: d["config"].pop("exposed_ports"),
        lambda d: d["config"].pop("volumes"),
        lambda d: d.pop("layers"),
        lambda d: d.__setitem__("manifest_digest", "sha256:nothex"),
        lambda d: d["layers"][0].pop("diff_id"),
    ],
)
def test_what_msb_calls_corrupt_is_rejected(mutate) -> None:  # type: ignore[no-untyped-def]
    doc = json.loads(WH1)
    mutate(doc)
    with pytest.raises((ValidationError, ValueError)):
        CachedImageMetadata.from_json_bytes(compact_json(doc))


def test_unicode_is_not_escaped() -> None:
    meta = CachedImageMetadata.from_json_bytes(WH1)
    meta.config.labels["naïve"] = "☃"
    assert "☃".encode() in meta.to_json_bytes()


def test_image_config_from_container_config() -> None:
    cfg = ContainerConfig.model_validate(
        {"Env": ["A=1"], "Cmd": ["sh"], "ExposedPorts": {"80/tcp": {}}, "Volumes": {"/v": {}},
         "Labels": {"k": "v"}, "StopSignal": "SIGTERM", "WorkingDir": "/w", "User": "1:2"}
    )
    ic = ImageConfig.from_container_config(cfg)
    assert ic.env == ["A=1"] and ic.cmd == ["sh"] and ic.entrypoint is None
    assert ic.exposed_ports == ["80/tcp"] and ic.volumes == ["/v"]
    assert ic.labels == {"k": "v"} and ic.stop_signal == "SIGTERM"
    empty = ImageConfig.from_container_config(None)
    assert empty.env == [] and empty.labels == {} and empty.cmd is None


def test_oci_client_manifest_serialisation_order() -> None:
    manifest = ImageManifest.model_validate_json(
        json.dumps({
            "layers": [{"size": 5, "digest": LAYER, "mediaType": "x"}],
            "config": {"digest": CFG, "size": 3, "mediaType": "c"},
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "schemaVersion": 2,
        })
    )
    assert manifest.to_oci_client_json() == (
        '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
        f'"config":{{"mediaType":"c","digest":"{CFG}","size":3}},'
        f'"layers":[{{"mediaType":"x","digest":"{LAYER}","size":5}}]}}'
    )


def test_config_file_diff_ids() -> None:
    cfg = ImageConfigFile.model_validate_json(json.loads(WH1)["raw_config_json"])
    assert [str(d) for d in cfg.diff_ids] == [LAYER]
    assert cfg.architecture == "amd64"
