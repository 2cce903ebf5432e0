"""Our Transformer <-> transformers' LlamaForCausalLM: same logits both ways, in fp32 on CPU,
with GQA, tied and untied heads, sharded and single-file weights."""

import json

import pytest
import torch

from trainer import hf_checkpoint, hf_convert
from trainer.attention import standard_attention
from trainer.config import ModelConfig
from trainer.model import Transformer

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 97, 24


def _model(seed=0, **kw) -> Transformer:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, rope_theta=500000.0, norm_eps=1e-6)
    base.update(kw)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**base).args(vocab_size=VOCAB, max_seq_len=SEQ), standard_attention)
    # Norm weights start at 1: randomise them so a swapped or dropped norm cannot go unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def _ids():
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("n_kv_heads", [2, 4], ids=["gqa", "mha"])
def test_exported_model_gives_our_logits_in_transformers(tmp_path, tie, n_kv_heads):
    ours = _model(tie_embeddings=tie, n_kv_heads=n_kv_heads)
    files = hf_checkpoint.save(tmp_path, ours.state_dict(), ours.args, eos_id=0)
    assert files == ["config.json", "model.safetensors"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.config.num_key_value_heads == n_kv_heads and hf.config.tie_word_embeddings == tie
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-5, atol=1e-5)


def test_sharded_export_loads_in_transformers_and_back_into_ours(tmp_path):
    ours = _model(tie_embeddings=False)
    files = hf_checkpoint.save(tmp_path, ours.state_dict(), ours.args, eos_id=0, max_shard_bytes=64 * 1024)
    assert hf_checkpoint.INDEX_FILE in files and len(files) > 3
    index = json.loads((tmp_path / hf_checkpoint.INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(hf_convert.expected_hf_shapes(ours.args))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    back = Transformer(ours.args, standard_attention).eval()
    back.load_state_dict(hf_checkpoint.load_state_dict(tmp_path, ours.args))
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-5, atol=1e-5)
        assert torch.equal(back(ids), ours(ids))


def test_a_transformers_llama_loads_into_ours_with_its_logits(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-5,
                                   rope_theta=20000.0, tie_word_embeddings=False, max_position_embeddings=64)
    torch.manual_seed(3)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    fields = hf_checkpoint.model_fields(tmp_path)
    assert fields == {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 1, "ffn_hidden": 160,
                      "vocab_size": VOCAB, "rope_theta": 20000.0, "norm_eps": 1e-5, "tie_embeddings": False}
    args = ModelConfig(**fields).args(vocab_size=VOCAB, max_seq_len=SEQ)
    ours = Transformer(args, standard_attention).eval()
    ours.load_state_dict(hf_checkpoint.load_state_dict(tmp_path, args))
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_rope_permutation_round_trips():
    w = torch.randn(4 * 16, 64)
    assert torch.equal(hf_convert.half_to_interleaved(hf_convert.interleaved_to_half(w, 4), 4), w)
    assert not torch.equal(hf_convert.interleaved_to_half(w, 4), w)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("model_type"), "no model_type, expected 'llama'"),
    (lambda c: c.update(model_type="mistral"), "model_type 'mistral', expected 'llama'"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (lambda c: c.update(rope_parameters={"rope_type": "llama3", "rope_theta": 1.0}), "rope type 'llama3'"),
    (lambda c: c.update(intermediate_size=128), "has shape [160, 64], the config implies [128, 64]"),
])
def test_not_a_llama_checkpoint_is_named_with_what_is_wrong(tmp_path, change, message):
    ours = _model(ffn_hidden=160)
    hf_checkpoint.save(tmp_path, ours.state_dict(), ours.args, eos_id=0)
    cfg = json.loads((tmp_path / "config.json").read_text())
    change(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(hf_convert.NotLlama, match=str(tmp_path)) as e:
        hf_checkpoint.model_fields(tmp_path)
    assert message in str(e.value)


def test_missing_tensor_and_missing_weights_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    ours = _model(tie_embeddings=False)
    hf_checkpoint.save(tmp_path, ours.state_dict(), ours.args, eos_id=0)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(hf_convert.NotLlama, match="missing tensor lm_head.weight"):
        hf_checkpoint.model_fields(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(hf_convert.NotLlama, match="no model.safetensors"):
        hf_checkpoint.model_fields(tmp_path)
