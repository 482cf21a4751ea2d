"""HF safetensors import: files written here by transformers, compared with its own forward."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from gemb.checkpoints import import_hf, layout
from gemb.models import config, gemma3
from tiny_checkpoints import write_tiny_hf_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("dtype,shard", [(torch.float32, None), (torch.bfloat16, "100KB")],
                         ids=["fp32_single_file", "bf16_sharded"])
def test_imported_weights_reproduce_transformers_logits(tmp_path, dtype, shard):
    write_tiny_hf_checkpoint(tmp_path, dtype, shard)
    # Reload in fp32: the stored (possibly bf16) values, with rope tables rebuilt in fp32.
    reference = transformers.Gemma3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("*.safetensors"))) > 1
    preset, upstream = import_hf.load_hf(tmp_path)
    assert preset.name == "tiny"
    causal = preset.replace(attention_mode="causal")
    tokens = np.asarray([[2, 17, 99, 5, 301, 44, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 200, 3]])
    _, ours = gemma3.Transformer(causal).apply(
        {"params": layout.to_model_layout(upstream, causal)}, jnp.asarray(tokens), return_logits=True)
    with torch.no_grad():
        theirs = reference(torch.tensor(tokens.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-4 * np.abs(theirs).max())


def test_config_inferred_from_shapes_without_config_json(tmp_path):
    write_tiny_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").unlink()
    preset, _ = import_hf.load_hf(tmp_path)
    assert preset.name == "tiny"


def test_shapes_that_do_not_match_the_preset_are_named(tmp_path):
    write_tiny_hf_checkpoint(tmp_path)
    wrong = config.TINY.replace(name="tiny_wide_mlp", hidden_dim=256)
    with pytest.raises(ValueError, match=r"does not fit model preset 'tiny_wide_mlp'.*mlp/gating_einsum"):
        import_hf.load_hf(tmp_path, wrong)


def test_missing_folder_shard_and_truncated_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_hf.load_hf(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        import_hf.load_hf(tmp_path)
    sharded = tmp_path / "sharded"
    write_tiny_hf_checkpoint(sharded, max_shard_size="100KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[0]
    data = (sharded / victim).read_bytes()
    (sharded / victim).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        import_hf.load_hf(sharded)
    (sharded / victim).unlink()
    with pytest.raises(FileNotFoundError, match=f"lists shard {victim}"):
        import_hf.load_hf(sharded)
