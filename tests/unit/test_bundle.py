"""Model bundles: an exact round trip, and a clear BundleError for every kind of bad input."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
import torch

from crowdtrain.data.chat import ChatTemplate
from crowdtrain.model.bundle import (
    BUNDLE_FORMAT,
    CONFIG,
    MAX_CONFIG_BYTES,
    TOKENIZER,
    WEIGHTS,
    BundleError,
    load_bundle,
    model_from_params,
    parameter_count,
    write_bundle,
    write_model_bundle,
)
from crowdtrain.model.gpt import GPT, GPTConfig
from crowdtrain.model.tokenizer import Tokenizer
from crowdtrain.protocol import safetensors_io

CONFIG_TINY = GPTConfig(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_embd=8)
TEMPLATE = ChatTemplate(user="<u>\n", assistant="<a>\n", system="<s>\n")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(["the cat sat on the mat, the dog sat on the log"] * 20, 280)


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIG_TINY)


@pytest.fixture(scope="module")
def bundle_bytes(model, tokenizer) -> bytes:
    return write_model_bundle(
        model, tokenizer, TEMPLATE, version=42, lineage="abc123", preset="tiny"
    )


def members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def rezip(entries: list[tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=method) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()


def changed(data: bytes, **replacements: bytes) -> bytes:
    """The bundle with members replaced (keys: weights, config, tokenizer)."""
    names = {"weights": WEIGHTS, "config": CONFIG, "tokenizer": TOKENIZER}
    found = members(data)
    for key, value in replacements.items():
        found[names[key]] = value
    return rezip(list(found.items()))


def config_of(data: bytes) -> dict:
    return json.loads(members(data)[CONFIG])


def weights(tensors: dict[str, torch.Tensor], version: str = "42", lineage: str = "abc123"):
    metadata = {"format": BUNDLE_FORMAT, "version": version, "lineage": lineage}
    return safetensors_io.dump(tensors, metadata)


def params_of(model: GPT) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.trainable_named_parameters()}


# ---- the round trip ----------------------------------------------------------------------


def test_round_trip_is_exact(model, tokenizer, bundle_bytes):
    bundle = load_bundle(bundle_bytes)
    assert bundle.config == CONFIG_TINY
    assert bundle.tokenizer.to_json() == tokenizer.to_json()
    assert bundle.chat_template == TEMPLATE
    assert (bundle.info.version, bundle.info.lineage, bundle.info.preset) == (42, "abc123", "tiny")
    loaded = dict(bundle.model.named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(loaded[name], param), name
    # the output layer is the embedding, as in a GPT built normally
    assert bundle.model.lm_head.weight is bundle.model.transformer.wte.weight
    idx = torch.tensor([[1, 2, 3]])
    assert torch.equal(bundle.model(idx)[0], model.eval()(idx)[0])


def test_the_layout_is_three_members_weights_stored(bundle_bytes):
    with zipfile.ZipFile(io.BytesIO(bundle_bytes)) as archive:
        infos = {info.filename: info for info in archive.infolist()}
    assert sorted(infos) == sorted([WEIGHTS, CONFIG, TOKENIZER])
    assert infos[WEIGHTS].compress_type == zipfile.ZIP_STORED
    config = config_of(bundle_bytes)
    assert config["format"] == BUNDLE_FORMAT and config["model"] == CONFIG_TINY.to_dict()
    assert set(config) == {
        "format",
        "model",
        "preset",
        "version",
        "lineage",
        "chat_template",
        "crowdtrain_version",
    }


def test_loads_from_a_path_and_a_file(tmp_path, bundle_bytes):
    path = tmp_path / "model.zip"
    path.write_bytes(bundle_bytes)
    assert load_bundle(path).info.version == 42
    with open(path, "rb") as handle:
        assert load_bundle(handle).info.version == 42


def test_write_bundle_refuses_params_that_do_not_fit_the_config(model, tokenizer):
    params = params_of(model)
    params.pop("transformer.wpe.weight")
    with pytest.raises(BundleError, match="lacks transformer.wpe.weight"):
        write_bundle(params, CONFIG_TINY, tokenizer, TEMPLATE, version=1)


@pytest.mark.parametrize("bias", [False, True])
def test_parameter_count_is_what_a_gpt_holds(bias):
    config = GPTConfig(**{**CONFIG_TINY.to_dict(), "n_layer": 3, "bias": bias})
    with torch.device("meta"):
        built = GPT(config)
    assert parameter_count(config) == sum(p.numel() for _, p in built.trainable_named_parameters())


def test_a_config_too_big_for_the_cap_is_refused_before_it_is_built(bundle_bytes):
    config = config_of(bundle_bytes)
    config["model"] = {**CONFIG_TINY.to_dict(), "n_layer": 10**9}
    with pytest.raises(BundleError, match="needs .* bytes of weights, over the cap"):
        load_bundle(changed(bundle_bytes, config=json.dumps(config).encode()))


def test_model_from_params_uses_the_given_tensors(model):
    params = params_of(model)
    built = model_from_params(CONFIG_TINY, params)
    assert built.transformer.wpe.weight.data_ptr() == params["transformer.wpe.weight"].data_ptr()
    assert not built.training


# ---- refusals ----------------------------------------------------------------------------


def test_not_a_zip():
    with pytest.raises(BundleError, match="not a readable zip"):
        load_bundle(b"PK\x03\x04 this is no zip")


def test_a_missing_member(bundle_bytes):
    found = members(bundle_bytes)
    del found[TOKENIZER]
    with pytest.raises(BundleError, match="lacks tokenizer.json"):
        load_bundle(rezip(list(found.items())))


@pytest.mark.parametrize("name", ["extra.txt", "../config.json", "/etc/passwd", "a/config.json"])
def test_an_unexpected_member(bundle_bytes, name):
    entries = [*members(bundle_bytes).items(), (name, b"{}")]
    with pytest.raises(BundleError, match="unexpected member"):
        load_bundle(rezip(entries))


def test_a_member_twice(bundle_bytes):
    entries = [*members(bundle_bytes).items()]
    with pytest.warns(UserWarning, match="Duplicate name"):
        data = rezip([*entries, (CONFIG, entries[0][1])])
    with pytest.raises(BundleError, match="config.json twice"):
        load_bundle(data)


def test_a_zip_bomb_is_refused_before_it_is_unpacked(bundle_bytes):
    bomb = b" " * (MAX_CONFIG_BYTES + 1)  # deflates to about a kilobyte
    data = changed(bundle_bytes, config=bomb)
    assert len(data) < len(bundle_bytes) + 10_000
    with pytest.raises(BundleError, match="config.json unpacks to .* over its cap"):
        load_bundle(data)


def test_the_total_size_cap(bundle_bytes):
    with pytest.raises(BundleError, match="over the cap"):
        load_bundle(bundle_bytes, max_bytes=100_000)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format": "crowdtrain.bundle/9"}, "format is 'crowdtrain.bundle/9'"),
        ({"surprise": 1}, "surprise: Extra inputs are not permitted"),
        ({"version": "42"}, "version: Input should be a valid integer"),
        ({"model": {"n_layer": 1}}, "model: GPTConfig.vocab_size"),
        ({"chat_template": {"user": "", "assistant": "a", "system": "s"}}, "chat_template"),
    ],
)
def test_a_bad_config(bundle_bytes, change, message):
    config = {**config_of(bundle_bytes), **change}
    if change.get("model") == {"n_layer": 1}:
        config["model"] = {**CONFIG_TINY.to_dict(), "vocab_size": 0}
    with pytest.raises(BundleError, match=message):
        load_bundle(changed(bundle_bytes, config=json.dumps(config).encode()))


def test_config_that_is_not_json(bundle_bytes):
    with pytest.raises(BundleError, match="config.json is not UTF-8 JSON"):
        load_bundle(changed(bundle_bytes, config=b"\xff{"))


def test_a_bad_tokenizer(bundle_bytes):
    with pytest.raises(BundleError, match="tokenizer.json: not a valid tokenizer JSON"):
        load_bundle(changed(bundle_bytes, tokenizer=b"{}"))


def test_a_tokenizer_bigger_than_the_vocabulary(bundle_bytes):
    config = config_of(bundle_bytes)
    small = GPTConfig(**{**CONFIG_TINY.to_dict(), "vocab_size": 260})
    config["model"] = small.to_dict()
    torch.manual_seed(0)
    params = params_of(GPT(small))
    data = changed(bundle_bytes, config=json.dumps(config).encode(), weights=weights(params))
    with pytest.raises(BundleError, match="more than the model's vocab_size"):
        load_bundle(data)


def test_tensors_that_do_not_match_the_config(model, bundle_bytes):
    params = params_of(model)
    params["transformer.wpe.weight"] = torch.zeros(17, 8)
    with pytest.raises(BundleError, match=r"transformer.wpe.weight has shape \[17, 8\]"):
        load_bundle(changed(bundle_bytes, weights=weights(params)))


def test_a_missing_and_an_extra_tensor(model, bundle_bytes):
    params = params_of(model)
    params["lm_head.weight"] = params.pop("transformer.ln_f.weight")
    with pytest.raises(BundleError, match="lacks transformer.ln_f.weight.*lm_head.weight"):
        load_bundle(changed(bundle_bytes, weights=weights(params)))


def test_weights_that_are_not_fp32(model, bundle_bytes):
    params = {name: p.half() for name, p in params_of(model).items()}
    with pytest.raises(BundleError, match="is F16; bundles hold fp32"):
        load_bundle(changed(bundle_bytes, weights=weights(params)))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights(model, bundle_bytes, value):
    params = params_of(model)
    params["transformer.h.0.mlp.c_fc.weight"][3, 4] = value
    with pytest.raises(BundleError, match="c_fc.weight holds NaN or infinite values"):
        load_bundle(changed(bundle_bytes, weights=weights(params)))


def test_weights_of_another_version(model, bundle_bytes):
    with pytest.raises(BundleError, match="version '7' but config.json says 42"):
        load_bundle(changed(bundle_bytes, weights=weights(params_of(model), version="7")))


def test_weights_that_are_not_safetensors(bundle_bytes):
    with pytest.raises(BundleError, match="model.safetensors: "):
        load_bundle(changed(bundle_bytes, weights=b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"))
