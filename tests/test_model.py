"""The Llama-style model: shapes, parameter accounting, and that it can learn."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from trainer import model as model_mod
from trainer.attention import kernel_fn, standard_attention
from trainer.config import ModelConfig
from trainer.model import Transformer


def _args(**kw):
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2)
    base.update(kw)
    return ModelConfig(**base).args(vocab_size=97, max_seq_len=32)


def test_forward_shapes_and_loss_near_uniform_at_init():
    torch.manual_seed(0)
    model = Transformer(_args(), standard_attention)
    x, y = torch.randint(0, 97, (3, 21)), torch.randint(0, 97, (3, 21))
    logits, loss = model(x, y)
    assert logits.shape == (3, 21, 97)
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5


def test_tied_head_shares_the_embedding_and_untied_adds_a_matrix():
    tied, untied = Transformer(_args(), standard_attention), Transformer(_args(tie_embeddings=False), standard_attention)
    assert tied.output.weight is tied.tok_embeddings.weight
    n_tied = sum(p.numel() for p in tied.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == 97 * 64
    # The MFU convention counts the untied head but not the embedding.
    assert untied.args.non_embedding_params() == n_untied - 97 * 64
    assert tied.args.non_embedding_params() == n_tied - 97 * 64


def test_gqa_has_fewer_key_value_weights():
    gqa = Transformer(_args(n_kv_heads=1), standard_attention)
    assert gqa.layers[0].attn.wk.weight.shape == (16, 64)


def test_sequence_longer_than_max_seq_len_is_refused():
    model = Transformer(_args(), standard_attention)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_same_seed_same_weights_regardless_of_attention_kernel():
    torch.manual_seed(5)
    a = Transformer(_args(), standard_attention)
    torch.manual_seed(5)
    b = Transformer(_args(), kernel_fn("sdpa_flash_cpu"))
    x = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["standard", "sdpa_flash_cpu"])
def test_tiny_model_overfits_one_batch(kernel):
    torch.manual_seed(0)
    model = Transformer(_args(), kernel_fn(kernel))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 97, (4, 32))
    first = None
    for _ in range(150):
        _, loss = model(x[:, :-1], x[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 4.0 and loss.item() < 0.1


@pytest.mark.parametrize("setting,blocks", [(True, [0, 1, 2, 3]), (2, [0, 2]), (3, [0, 3]), (4, [0]), (5, [0])])
def test_activation_checkpointing_recomputes_every_nth_block_with_the_same_loss_and_gradients(
        monkeypatch, setting, blocks):
    calls = []

    def counted(fn, *args, **kw):
        calls.append(fn.__self__)  # fn is a block's bound _body
        return checkpoint(fn, *args, **kw)

    monkeypatch.setattr(model_mod, "checkpoint", counted)
    torch.manual_seed(1)
    plain = Transformer(_args(n_layers=4), standard_attention)
    ckpt_args = ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2).args(
        vocab_size=97, max_seq_len=32, activation_checkpointing=setting)
    ckpt = Transformer(ckpt_args, standard_attention)
    ckpt.load_state_dict(plain.state_dict())
    assert [i for i, b in enumerate(ckpt.layers) if b.activation_checkpointing] == blocks
    x = torch.randint(0, 97, (2, 16))
    losses = []
    for m in (plain, ckpt):
        loss = m(x, x)[1]
        loss.backward()
        losses.append(loss)
    assert [list(ckpt.layers).index(b) for b in calls] == blocks  # the plain model checkpoints none
    torch.testing.assert_close(losses[0], losses[1])
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)
    calls.clear()
    with torch.no_grad():
        ckpt.eval()(x)
    assert calls == []  # only training recomputes
