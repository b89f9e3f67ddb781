"""The backbone module (mrm_ray.backbone): the pooling table and the identity a table's provenance records.

Encoding with real tiny models, against a plain per-text loop, is in test_embed.py.
"""
from __future__ import annotations

import torch

from mrm_ray import backbone


def test_pooling_known_answers_for_either_padding_side():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])   # real tokens first
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])    # real tokens last
    P = backbone.POOLING
    assert torch.equal(P["last"](hidden, right), torch.stack([hidden[0, 2], hidden[1, 1]]))
    assert torch.equal(P["last"](hidden, left), torch.stack([hidden[0, 3], hidden[1, 3]]))
    assert torch.equal(P["cls"](hidden, right), torch.stack([hidden[0, 0], hidden[1, 0]]))
    assert torch.equal(P["cls"](hidden, left), torch.stack([hidden[0, 1], hidden[1, 2]]))
    torch.testing.assert_close(P["mean"](hidden, right), torch.stack([hidden[0, :3].mean(0), hidden[1, :2].mean(0)]))
    torch.testing.assert_close(P["mean"](hidden, left), torch.stack([hidden[0, 1:].mean(0), hidden[1, 2:].mean(0)]))


def test_every_pooling_is_offered():
    assert backbone.POOLINGS == ("auto", *backbone.POOLING)


def test_backbone_id_names_the_embedding_space_not_the_folder():
    from transformers import LlamaConfig

    a = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100)
    b = LlamaConfig(**{**a.to_dict(), "_name_or_path": "/another/folder/of/the/same/model"})
    c = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100)
    assert backbone.backbone_id(a) == backbone.backbone_id(b) != backbone.backbone_id(c)
    assert backbone.backbone_id(a).startswith("llama-")


def test_hidden_of_a_left_padded_batch_equals_each_text_alone_and_keeps_the_graph(tmp_path):
    """`mrm finetune` trains through PairEncoder.hidden, the pass `mrm embed` runs: with left padding, a short
    text's embedding in a batch is its embedding alone, and the graph is kept for the backward pass."""
    from tiny_models import tiny_reward_model

    path = tiny_reward_model(tmp_path / "m", padding_side="left")
    model, tok = backbone.load_backbone(path, device="cpu", dtype="float32")
    enc = backbone.PairEncoder(model, tok)
    enc.base.requires_grad_(True)   # as select_trainable leaves the trained blocks
    assert enc.left_pad
    seqs, _ = enc.tokenize([[{"role": "user", "content": "a short one"}],
                            [{"role": "user", "content": "a longer text, with quite a few more words in it"}]])
    assert len(seqs[0]) < len(seqs[1])
    pool = backbone.POOLING[enc.pooling]
    batch = pool(*enc.hidden(seqs))
    assert batch.requires_grad
    alone = torch.cat([pool(*enc.hidden([s])) for s in seqs])
    torch.testing.assert_close(batch, alone, rtol=1e-4, atol=1e-5)
