"""Write one user's personalized reward model as a standard transformers checkpoint.

    mrm export-hf --run runs/r1 --user alice --backbone Skywork/Skywork-Reward-V2-Llama-3.1-8B \\
        --weights scored/ --out models/alice            # weights from `mrm score`
    mrm export-hf ... --support data/emb --out models/alice   # adapt on alice's rows of an embeddings table

MRM's reward of a response is linear in the backbone's last-token hidden state e:
r_u(e) = v_u . e with v_u = s W^T mixing(theta_u).  A sequence-classification model
(`LlamaForSequenceClassification` and friends) computes exactly `score.weight @ h`
on the hidden state h of the last non-padding token, so the personalized model is
the frozen backbone with `score.weight = v_u` (num_labels=1, no bias):

    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    model = AutoModelForSequenceClassification.from_pretrained("models/alice")
    tok = AutoTokenizer.from_pretrained("models/alice")
    ids = tok.apply_chat_template(messages, tokenize=True, return_tensors="pt", return_dict=True)
    reward = model(**ids).logits[0, 0]          # = alice's MRM reward of that conversation

The backbone may be a reward model (its score head is replaced) or a base / causal
LM checkpoint of a decoder (a score head is added).  Encoders (BERT & co.) pool
differently and are refused: the run records how its embeddings were made (pooling,
backbone), and export-hf checks them against --backbone.  Where the user's weights come from, in order:
--weights (a score output or weights table), --support (adapt on the user's pairs),
else `<run>/per_user.parquet` of `mrm evaluate`; a user found in none of them gets the
population prior theta_0, with a warning.  config.json records the user and the run
(`mrm_user`, `mrm`).
"""
from __future__ import annotations

import logging
import os
import tempfile

import torch

from mrm_ray import api
from mrm_ray.data import runs, storage
from mrm_ray.errors import UserError

log = logging.getLogger(__name__)


def user_weights(rm: api.RewardModel, user_id: str, weights: str | None = None, support: str | None = None,
                 support_split: str = "all") -> tuple[api.UserReward, str]:
    """(the user's reward model, where it came from: weights | support | per_user | prior)."""
    if support is not None:
        user = rm.adapt_from_table(support, user_id, support_split)
        if user.prior:
            log.warning("user %r has no pairs in %s: exporting the population prior theta_0", user_id, support)
            return user, "prior"
        return user, "support"
    source = weights
    if source is None and storage.exists(storage.join(rm.run.uri, runs.PER_USER)):
        source = storage.join(rm.run.uri, runs.PER_USER)
    if source is None:
        log.warning("no --weights or --support given and %s has no %s: exporting the population prior theta_0 "
                    "for user %r", rm.run.uri, runs.PER_USER, user_id)
        return rm.prior(), "prior"
    user = rm.user_from_weights(source, user_id)
    if user is None:
        log.warning("user %r is not in %s: exporting the population prior theta_0", user_id, source)
        return rm.prior(), "prior"
    return user, "weights" if source == weights else "per_user"


def check_backbone(backbone: str, config, made_with: dict) -> None:
    """The exported model reads the last token's hidden state of `backbone`: the run's embeddings must have
    been made that way (their provenance), or, for a table that does not say, the backbone must be a decoder."""
    from mrm_ray.backbone import ENCODER_TYPES, backbone_id

    pooling = made_with.get("pooling")
    if pooling is not None and pooling != "last":
        raise UserError(f"the run's embeddings were pooled with {pooling!r} ({made_with.get('backbone')}); a "
                        "sequence-classification model reads the last token's hidden state, so only runs on "
                        "last-token embeddings (mrm embed --pooling last) can be exported")
    made_id = made_with.get("backbone_id")
    if made_id is not None and made_id != backbone_id(config):
        raise UserError(f"backbone {backbone} is not the model that embedded the run's pairs "
                        f"({made_with.get('backbone')})")
    if pooling is None and config.model_type in ENCODER_TYPES:
        raise UserError(f"backbone {backbone} is an encoder ({config.model_type}); export-hf needs a decoder whose "
                        "sequence-classification head reads the last token's hidden state (Llama, Mistral, Qwen, ...)")


def build_model(backbone: str, vector: torch.Tensor, dtype: str = "auto", made_with: dict | None = None):
    """(model, tokenizer): `backbone` as a one-logit sequence classifier whose score head is `vector`.

    made_with: the provenance of the run's embeddings (mrm_ray.data.runs.provenance), checked first.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from mrm_ray.backbone import hidden_size, load_config, load_error, load_tokenizer

    config = load_config(backbone)
    check_backbone(backbone, config, made_with or {})
    tokenizer = load_tokenizer(backbone)
    path = os.path.expanduser(str(backbone))
    hidden = hidden_size(config)
    if hidden != vector.shape[0]:
        raise UserError(f"backbone {backbone} has hidden size {hidden}, the run's embeddings have d={vector.shape[0]}")
    config.num_labels = 1
    if config.pad_token_id is None:  # the head finds the last token by pad id; batches need one
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a base checkpoint's "score.weight newly initialized": we set it next
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    except (OSError, ValueError) as e:
        raise load_error(backbone, e) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Linear):
        raise UserError(f"backbone {backbone} ({type(model).__name__}) has no linear `score` head to personalize")
    with torch.no_grad():
        head.weight.data = vector.reshape(1, -1).to(head.weight.dtype).clone()
        if head.bias is not None:
            head.bias.zero_()
    return model.eval(), tokenizer


def export(run_uri: str, user_id: str, backbone: str, out: str, weights: str | None = None,
           support: str | None = None, support_split: str = "all", dtype: str = "auto",
           overwrite: bool = False, prior: bool = False) -> dict:
    """Export one user's reward model to `out` (local folder or s3://); returns what config.json records.

    A user without pairs or weights is an error unless `prior` (then the population prior is exported).
    """
    inputs = [run_uri, weights, support]
    storage.check_output(out, "export-hf", inputs, overwrite)  # before loading anything big
    rm = api.load(run_uri)
    user, source = user_weights(rm, user_id, weights, support, support_split)
    if source == "prior" and not prior:
        raise UserError(f"user {user_id!r} has no adapted weights or pairs here (see the warning above); "
                        f"pass --prior to export the population prior theta_0 for it")
    model, tokenizer = build_model(backbone, user.vector, dtype, rm.run.info.get("embeddings") or {})
    record = {"user_id": str(user_id), "run": run_uri, "source": source, "prior": user.prior,
              "n_support": user.n_support, "theta": [float(x) for x in user.theta],
              "inner_steps": rm.personalizer.inner.steps, "backbone": str(backbone),
              "reward": "logit = v_u . h_last, v_u = s W^T mixing(theta)"}
    model.config.mrm_user = str(user_id)
    model.config.mrm = record
    with storage.atomic_output(out, "export-hf", inputs, overwrite) as staging:
        if storage.is_remote(staging):
            with tempfile.TemporaryDirectory(prefix="mrm-export-") as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                for name in sorted(os.listdir(tmp)):
                    with open(os.path.join(tmp, name), "rb") as f:
                        storage.write_bytes(storage.join(staging, name), f.read())
        else:
            model.save_pretrained(storage.resolve(staging)[1])
            tokenizer.save_pretrained(storage.resolve(staging)[1])
    return record
