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
