"""The model: our Whisper port gives transformers' logits from every checkpoint format we read, scanned
and rematerialised layers change nothing, bfloat16 stays close, and a fresh model is initialised as
transformers initialises one."""

import functools
import os
import re
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from flax.serialization import msgpack_serialize
from transformers import WhisperConfig, WhisperForConditionalGeneration

import run_scream as rs
from tests.support import LOGITS_TOLERANCE, model_randomize, model_torch_logits

# Two tiny configs that differ in everything a config can vary: width, heads (so head_dim),
# layer counts (encoder deeper than decoder and the reverse), ffn sizes, vocabulary, 80 vs 128
# mel bins (large-v3), max positions. B sets scale_embedding, which transformers' Whisper reads
# but never applies.
MODEL_CONFIGS = {
    "a": dict(
        vocab_size=300,
        num_mel_bins=80,
        d_model=32,
        encoder_layers=2,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=96,
        max_source_positions=16,
        max_target_positions=24,
        pad_token_id=299,
        bos_token_id=299,
        eos_token_id=299,
        decoder_start_token_id=298,
    ),
    "b": dict(
        vocab_size=411,
        num_mel_bins=128,
        d_model=48,
        encoder_layers=1,
        decoder_layers=3,
        encoder_attention_heads=3,
        decoder_attention_heads=6,
        encoder_ffn_dim=80,
        decoder_ffn_dim=112,
        max_source_positions=25,
        max_target_positions=30,
        pad_token_id=400,
        bos_token_id=400,
        eos_token_id=400,
        decoder_start_token_id=401,
        scale_embedding=True,
    ),
}


LOAD_FORMATS = ("safetensors", "sharded", "bin", "msgpack")


def model_whisper_config(name: str) -> WhisperConfig:
    return WhisperConfig(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, **MODEL_CONFIGS[name])


@functools.partial(jax.jit, static_argnums=0)
def model_logits(model, params, features, ids):
    return model.apply({"params": params}, features, ids)


def model_inputs(config, seed: int, batch_size: int = 2, length: int = 5):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(batch_size, config.num_mel_bins, 2 * config.max_source_positions)).astype(np.float32)
    ids = rng.integers(0, config.vocab_size, size=(batch_size, length)).astype(np.int64)
    ids[:, 0] = config.decoder_start_token_id
    return features, ids


def model_old_flax_layout(state_dict: dict) -> dict:
    """transformers-Flax's (2023) parameter tree, written independently of run_scream:
    {"model": {"encoder": {"layers": {"0": {"self_attn": {"q_proj": {"kernel": (in, out)}}}}}}},
    conv kernels (k, in, out), LayerNorm `scale`, embeddings `embedding`, no proj_out (tied)."""
    tree: dict = {}
    for name, tensor in state_dict.items():
        if name == "proj_out.weight":
            continue
        weight = tensor.detach().numpy().astype(np.float32)
        *modules, leaf = name.split(".")
        if leaf == "weight":
            if "layer_norm" in modules[-1]:
                leaf = "scale"
            elif modules[-1].startswith("embed_"):
                leaf = "embedding"
            elif weight.ndim == 3:  # Conv1d (out, in, k) -> nn.Conv (k, in, out)
                leaf, weight = "kernel", weight.transpose(2, 1, 0)
            else:  # Linear (out, in) -> nn.Dense (in, out)
                leaf, weight = "kernel", weight.T
        node = tree
        for key in modules:  # "layers", "0", ... stay separate keys, as in transformers-Flax
            node = node.setdefault(key, {})
        node[leaf] = np.ascontiguousarray(weight)
    return tree


@pytest.fixture(scope="session")
def model_checkpoints(tmp_path_factory):
    """{config name: (torch model, {format: directory})}, each model saved in every format we read."""
    root = tmp_path_factory.mktemp("model_checkpoints")
    out = {}
    for seed, name in enumerate(MODEL_CONFIGS):
        config = model_whisper_config(name)
        torch.manual_seed(seed)
        torch_model = model_randomize(WhisperForConditionalGeneration(config), seed)
        dirs = {fmt: root / f"{name}_{fmt}" for fmt in LOAD_FORMATS}
        torch_model.save_pretrained(dirs["safetensors"])
        torch_model.save_pretrained(dirs["sharded"], max_shard_size="50KB")
        assert (dirs["sharded"] / "model.safetensors.index.json").exists()
        assert len(list(dirs["sharded"].glob("model-*.safetensors"))) > 1
        assert not (dirs["sharded"] / "model.safetensors").exists()
        # transformers 5 writes safetensors even with safe_serialization=False, so pickle it ourselves.
        config.save_pretrained(dirs["bin"])
        torch.save(torch_model.state_dict(), dirs["bin"] / "pytorch_model.bin")
        config.save_pretrained(dirs["msgpack"])
        (dirs["msgpack"] / "flax_model.msgpack").write_bytes(
            msgpack_serialize(model_old_flax_layout(torch_model.state_dict()))
        )
        for fmt, directory in dirs.items():
            weight_files = {p.name for p in directory.iterdir() if p.name in rs.WEIGHT_FILES}
            expected = {
                "safetensors": {"model.safetensors"},
                "sharded": {"model.safetensors.index.json"},
                "bin": {"pytorch_model.bin"},
                "msgpack": {"flax_model.msgpack"},
            }[fmt]
            assert weight_files == expected, (fmt, weight_files)
        out[name] = (torch_model, dirs)
    return out


@pytest.mark.parametrize("fmt", LOAD_FORMATS)
@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_model_load_formats_match_transformers_logits(model_checkpoints, name, fmt):
    torch_model, dirs = model_checkpoints[name]
    pretrained = rs.load_pretrained(str(dirs[fmt]))
    assert pretrained.config.to_dict()["num_mel_bins"] == MODEL_CONFIGS[name]["num_mel_bins"]
    model = rs.build_model(pretrained.config)
    features, ids = model_inputs(pretrained.config, seed=1)
    ours = np.asarray(model_logits(model, pretrained.params, features, ids.astype(np.int32)))
    theirs = model_torch_logits(torch_model, features, ids)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape == (2, 5, MODEL_CONFIGS[name]["vocab_size"])
    assert np.abs(theirs).max() > 0.5  # not a degenerate comparison
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=LOGITS_TOLERANCE)


def model_loss_and_logits(model, params, features, ids):
    logits = model.apply({"params": params}, features, ids)
    loss = jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])
    return loss, logits


def test_model_scan_and_remat_give_the_same_logits_and_gradients(model_generation_dir):
    # The tokenizer-backed model: 2 encoder and 2 decoder layers, so both scans have an order to keep.
    pretrained = rs.load_pretrained(str(model_generation_dir[0]))
    config = pretrained.config
    features, ids = model_inputs(config, seed=5, batch_size=2, length=6)
    ids = jnp.asarray(ids, jnp.int32)

    def logits_and_grads(scan, remat):
        model = rs.build_model(config, scan_layers=scan, remat=remat)
        params = rs.stack_layers(pretrained.params, model.dims) if scan else pretrained.params
        step = jax.jit(jax.grad(functools.partial(model_loss_and_logits, model), has_aux=True))
        grads, logits = step(params, features, ids)
        grads = rs.unstack_layers(grads) if scan else grads
        return np.asarray(logits), {k: np.asarray(v) for k, v in traverse_util.flatten_dict(grads).items()}

    reference, reference_grads = logits_and_grads(False, "none")
    assert max(np.abs(g).max() for g in reference_grads.values()) > 0.1  # gradients of a real size
    # remat full and dots with scan (how a pod trains; equal to unrolled/none also shows scan alone
    # is right), and the unrolled remat path (prevent_cse).
    for scan, remat in ((True, "full"), (True, "dots"), (False, "full")):
        logits, grads = logits_and_grads(scan, remat)
        np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-5, err_msg=f"scan={scan} remat={remat}")
        assert grads.keys() == reference_grads.keys()
        for path, grad in grads.items():
            np.testing.assert_allclose(
                grad, reference_grads[path], rtol=0, atol=1e-5, err_msg=f"scan={scan} remat={remat} {path}"
            )
    # The encoder positions are fixed (stop_gradient), as in transformers (requires_grad False).
    assert not reference_grads[("encoder", "embed_positions", "embedding")].any()


# Measured: max |logit| difference bfloat16 vs float32 0.013 here (logits up to 1.9), 0.02-0.05 on
# the other test models; 0.1 leaves room for other seeds without hiding a real error (a wrong
# cast or a lost layer moves logits by ~1).
BFLOAT16_LOGITS_TOLERANCE = 0.1


def test_model_bfloat16_stays_close_to_float32(model_checkpoints):
    config = model_whisper_config("a")
    pretrained = rs.load_pretrained(str(model_checkpoints["a"][1]["safetensors"]))
    features, ids = model_inputs(config, seed=1)  # the inputs of the float32 test: compiled once
    ids = ids.astype(np.int32)
    full = np.asarray(model_logits(rs.build_model(config), pretrained.params, features, ids))
    half_model = rs.build_model(config, dtype="bfloat16")
    half = model_logits(half_model, pretrained.params, features, ids)
    assert half.dtype == jnp.float32  # logits stay float32
    abstract = jax.eval_shape(functools.partial(rs.init_params, half_model), jax.random.key(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(abstract))  # parameters stay float32
    difference = np.abs(np.asarray(half) - full).max()
    print(f"bfloat16 vs float32: max |logit difference| {difference:.4f}, max |logit| {np.abs(full).max():.2f}")
    assert 0 < difference < BFLOAT16_LOGITS_TOLERANCE, difference


def model_populate_hub_cache(cache: Path, repo_id: str, source: Path) -> str:
    """huggingface_hub's cache layout: models--org--name/{blobs, snapshots/<commit>, refs/main}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted(source.iterdir())):
        blob = repo / "blobs" / f"{i:040x}"
        shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return commit


def test_model_hub_id_loads_from_offline_cache(model_checkpoints, tmp_path, monkeypatch):
    import huggingface_hub.constants

    torch_model, dirs = model_checkpoints["a"]
    cache = tmp_path / "hub"
    commit = model_populate_hub_cache(cache, "scream-test/tiny-whisper", dirs["sharded"])
    monkeypatch.chdir(tmp_path)  # "scream-test/tiny-whisper" is no local directory here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads these at import time; set what the environment above would have set.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    features, ids = model_inputs(torch_model.config, seed=7)
    theirs = model_torch_logits(torch_model, features, ids)
    for cache_dir in (None, str(cache)):  # the cache from the environment, then named explicitly
        if cache_dir is not None:
            monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
        pretrained = rs.load_pretrained("scream-test/tiny-whisper", cache_dir=cache_dir)
        snapshot = cache / "models--scream-test--tiny-whisper" / "snapshots" / commit
        assert Path(pretrained.source).resolve() == snapshot.resolve()
        ours = np.asarray(
            model_logits(rs.build_model(pretrained.config), pretrained.params, features, ids.astype(np.int32))
        )
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=LOGITS_TOLERANCE)
    with pytest.raises(rs.ConfigError, match="scream-test/not-cached"):
        rs.load_pretrained("scream-test/not-cached")


def test_model_missing_and_unexpected_weights_are_listed(model_checkpoints, tmp_path):
    from safetensors.torch import save_file

    torch_model, dirs = model_checkpoints["a"]
    state = {k: v.clone().contiguous() for k, v in torch_model.state_dict().items() if k != "proj_out.weight"}
    del state["model.encoder.layers.1.fc1.bias"]
    state["model.decoder.layers.0.extra_proj.weight"] = torch.zeros(4, 4)
    shutil.copy(dirs["safetensors"] / "config.json", tmp_path / "config.json")
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(rs.ConfigError) as error:
        rs.load_pretrained(str(tmp_path))
    message = str(error.value)
    assert re.search(r"missing.*encoder[./]layers[._]1[./]fc1[./]bias", message), message
    assert re.search(r"unexpected.*decoder[./]layers[._]0[./]extra_proj[./]", message), message


def test_model_pytorch_bin_without_torch_says_so(model_checkpoints, monkeypatch):
    _, dirs = model_checkpoints["a"]
    import transformers.configuration_utils

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    # ... and transformers says what it says without torch (else its config loader imports torch).
    monkeypatch.setattr(transformers.configuration_utils, "is_torch_available", lambda: False)
    with pytest.raises(rs.ConfigError, match=r"(?s)pytorch_model\.bin.*\btorch\b"):
        rs.load_pretrained(str(dirs["bin"]))


def test_model_nonexistent_path_is_a_config_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(rs.ConfigError, match="such-model"):
        rs.load_pretrained(str(missing))


def test_model_init_params_follow_transformers_init():
    from transformers.models.whisper.modeling_whisper import sinusoids

    config = model_whisper_config("b")
    config.init_std = 0.05  # not the default, and far from flax's lecun_normal (~1/sqrt(fan_in))
    model = rs.build_model(config)
    init = jax.jit(functools.partial(rs.init_params, model))  # as run() initialises a model
    params, again = init(jax.random.key(0)), init(jax.random.key(0))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)))  # seeded

    torch.manual_seed(0)
    torch_model = WhisperForConditionalGeneration(config)
    # Bit-for-bit would need torch's own float32 exp/sin kernels (about 1 ulp from correctly
    # rounded); measured 1.2e-7 here (the earlier float64 table was 1.8e-6 off).
    positions = np.asarray(params["encoder"]["embed_positions"]["embedding"])
    reference = sinusoids(config.max_source_positions, config.d_model).numpy()
    np.testing.assert_allclose(positions, reference, rtol=0, atol=2.5e-7)
    assert np.array_equal(reference, torch_model.model.encoder.embed_positions.weight.detach().numpy())
    # transformers zeroes the padding row of the token embedding (nn.Embedding padding_idx).
    embedding = np.asarray(params["decoder"]["embed_tokens"]["embedding"])
    assert not embedding[config.pad_token_id].any()
    assert not torch_model.model.decoder.embed_tokens.weight[config.pad_token_id].any()

    flat = traverse_util.flatten_dict(params)
    assert (
        flat.keys()
        == traverse_util.flatten_dict(
            rs.torch_to_flax({k: v.detach().numpy() for k, v in torch_model.state_dict().items()})
        ).keys()
    )
    for path, value in flat.items():
        value = np.asarray(value)
        if "layer_norm" in path[-2]:
            assert (value == (1.0 if path[-1] == "scale" else 0.0)).all(), path
        elif path[-1] == "bias":
            assert not value.any(), path
        elif path != ("encoder", "embed_positions", "embedding"):
            if path[-2] == "embed_tokens":
                value = np.delete(value, config.pad_token_id, axis=0)
            assert abs(value.mean()) < 0.01 and abs(value.std() / config.init_std - 1) < 0.1, (path, value.std())
