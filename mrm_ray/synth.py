"""Synthetic user populations with known ground truth (`mrm synth`).

`--kind embedding` writes an embeddings table directly: each user's true
reward is a vector w_u over the embedding, a mix of a few latent preference
directions shared across the population:

    w_u = a * common + m_u1 * d_A + m_u2 * d_B + m_u3 * d_M + personal noise

Most users lean to one of two majority types (A or B, which partly disagree),
a minority leans to a third direction (hard users: little data looks like
them), and some users are noisy labellers (labels flipped at random).  Labels
are sampled Bradley-Terry style: P(first preferred) = sigmoid(beta w_u.(e1-e2)).
Users have ragged pair counts; pairs come in conversations of 1-3 pairs and
are split train/test 50/50 by conversation.

The ground truth goes to `<out>/_truth/users.parquet` (type, flip rate,
latent mix, oracle test accuracy = how often the true w_u agrees with the
sampled labels on the user's test pairs).  Generation streams chunks of users
into Parquet row groups, so memory is bounded whatever --users is.

`--kind text` writes a pairs table of readable prompts and responses
(mrm_ray.synth_text) for `mrm embed`; that is what `mrm demo` uses.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa

from mrm_ray.data import contract as C
from mrm_ray.data import storage

log = logging.getLogger(__name__)

TRUTH_DIR = "_truth"
TYPES = ("A", "B", "M")


def _directions(dim: int, rng: np.random.Generator) -> np.ndarray:
    """common, d_A, d_B, d_M as rows; d_B leans against d_A so the majority types disagree."""
    q, _ = np.linalg.qr(rng.standard_normal((dim, 4)))
    common, a, perp, m = q.T
    b = -0.6 * a + 0.8 * perp
    return np.stack([common, a, b, m])


def _user_vectors(n: int, dirs: np.ndarray, rng, minority: float, noisy: float, personal: float):
    kind = rng.choice(3, size=n, p=[(1 - minority) / 2, (1 - minority) / 2, minority])
    mixw = np.zeros((n, 4))
    mixw[:, 0] = rng.uniform(0.3, 0.7, n)                 # everyone likes "quality" somewhat
    mixw[np.arange(n), kind + 1] = rng.uniform(0.8, 1.2, n)
    mixw[:, 1:] += personal * rng.standard_normal((n, 3))  # individual variation inside a type
    flip = np.where(rng.random(n) < noisy, rng.uniform(0.2, 0.35, n), rng.uniform(0.0, 0.05, n))
    return kind, mixw, flip


def generate_chunk(users: np.ndarray, dirs: np.ndarray, rng: np.random.Generator, pairs_per_user: int,
                   beta: float = 3.0, minority: float = 0.1, noisy: float = 0.15, personal: float = 0.2,
                   dtype=np.float32):
    """(embeddings table, truth table) for one chunk of user ids."""
    n, dim = len(users), dirs.shape[1]
    kind, mixw, flip = _user_vectors(n, dirs, rng, minority, noisy, personal)
    w = mixw @ dirs                                                       # (n, d) true reward vectors
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    counts = np.maximum(4, rng.poisson(pairs_per_user * rng.lognormal(0, 0.4, n))).astype(np.int64)
    owner = np.repeat(np.arange(n), counts)
    total = int(counts.sum())
    # conversations of 1-3 consecutive pairs; train/test by conversation
    first = np.r_[True, owner[1:] != owner[:-1]]
    new_conv = first | (rng.random(total) < 0.5)
    conv = np.cumsum(new_conv) - 1
    conv_test = rng.random(conv[-1] + 1) < 0.5
    is_test = conv_test[conv]
    e1 = rng.standard_normal((total, dim)).astype(np.float32)
    e2 = rng.standard_normal((total, dim)).astype(np.float32)
    # scale so beta * w.(e1 - e2) has std ~ beta
    margin = np.einsum("nd,nd->n", (e1 - e2), w[owner].astype(np.float32)) / np.sqrt(2.0)
    first_wins = rng.random(total) < 1 / (1 + np.exp(-beta * margin))
    first_wins ^= rng.random(total) < flip[owner]
    chosen = np.where(first_wins[:, None], e1, e2).astype(dtype)
    rejected = np.where(first_wins[:, None], e2, e1).astype(dtype)
    agree = (margin > 0) == first_wins
    uid = np.asarray(users, dtype=object)
    pair_idx = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    pair_ids = np.char.add(np.char.add(uid[owner].astype(str), "-"), pair_idx.astype(str))
    conv_ids = np.char.add(np.char.add(uid[owner].astype(str), "-c"), conv.astype(str))
    value_type = pa.float16() if dtype == np.float16 else pa.float32()
    table = pa.table({
        C.USER_ID: pa.array(uid[owner].astype(str)), C.PAIR_ID: pa.array(pair_ids),
        C.CONV_ID: pa.array(conv_ids), C.SPLIT: pa.array(np.where(is_test, C.TEST, C.TRAIN)),
        C.CHOSEN_EMB: pa.FixedSizeListArray.from_arrays(pa.array(chosen.reshape(-1), value_type), dim),
        C.REJECTED_EMB: pa.FixedSizeListArray.from_arrays(pa.array(rejected.reshape(-1), value_type), dim),
    })
    test_n = np.bincount(owner, weights=is_test, minlength=n)
    oracle = np.bincount(owner, weights=agree & is_test, minlength=n) / np.maximum(test_n, 1)
    truth = pa.table({C.USER_ID: pa.array(uid.astype(str)), "type": pa.array(np.asarray(TYPES)[kind]),
                      "flip_rate": pa.array(flip.astype(np.float32)),
                      "mix": pa.FixedSizeListArray.from_arrays(pa.array(mixw.reshape(-1).astype(np.float32)), 4),
                      "pairs": pa.array(counts), "oracle_test_accuracy": pa.array(oracle.astype(np.float32))})
    return table, truth


def write_embedding_population(out: str, users: int = 2000, pairs_per_user: int = 20, dim: int = 64,
                               seed: int = 0, chunk_users: int = 10_000, dtype: str = "float32",
                               overwrite: bool = False) -> dict:
    """Stream a synthetic embeddings population to `out`; returns a summary."""
    rng = np.random.default_rng(seed)
    dirs = _directions(dim, rng)
    np_dtype = np.float16 if dtype == "float16" else np.float32
    schema = C.embeddings_schema(dim, dtype=pa.float16() if dtype == "float16" else pa.float32())
    n_pairs, t0 = 0, time.time()
    with storage.atomic_output(out, "synth", overwrite=overwrite) as staging:
        writer = storage.PartWriter(staging, schema)
        truth_writer = None
        for lo in range(0, users, chunk_users):
            ids = np.array([f"u{i:08d}" for i in range(lo, min(users, lo + chunk_users))], dtype=object)
            table, truth = generate_chunk(ids, dirs, rng, pairs_per_user, dtype=np_dtype)
            writer.write(table)
            if truth_writer is None:
                truth_writer = storage.PartWriter(storage.join(staging, TRUTH_DIR), truth.schema)
            truth_writer.write(truth)
            n_pairs += table.num_rows
            log.info("synth: %d/%d users, %d pairs (%.0f users/s)", min(users, lo + chunk_users), users,
                     n_pairs, min(users, lo + chunk_users) / max(time.time() - t0, 1e-9))
        writer.close()
        truth_writer.close()
    return {"users": users, "pairs": n_pairs, "dim": dim, "out": out}


def write_zoo_population(out: str, name: str, users: int | None = None, dim: int | None = None,
                         seed: int | None = None, overwrite: bool = False):
    """One population of the zoo (mrm_ray.zoo) as an embeddings table with its truth; returns it in memory too."""
    from mrm_ray import zoo
    changes = {k: v for k, v in (("users", users), ("dim", dim), ("seed", seed)) if v is not None}
    g = zoo.generate(zoo.variant(name, **changes))
    ids = g.user_ids
    n, dim = len(g.user), g.spec.dim
    rank = np.arange(n) - np.repeat(np.cumsum(np.bincount(g.user)) - np.bincount(g.user), np.bincount(g.user))
    uid = ids[g.user].astype(str)
    table = pa.table({
        C.USER_ID: pa.array(uid),   # pair ids sort in generation order (a "file order")
        C.PAIR_ID: pa.array(np.char.add(np.char.add(uid, "/"), np.char.zfill(rank.astype(str), 6))),
        C.CONV_ID: pa.array(np.char.add("c", g.conv.astype(str))),
        C.SPLIT: pa.array(np.where(g.is_test, C.TEST, C.TRAIN)),
        C.CHOSEN_EMB: pa.FixedSizeListArray.from_arrays(pa.array(g.chosen.reshape(-1)), dim),
        C.REJECTED_EMB: pa.FixedSizeListArray.from_arrays(pa.array(g.rejected.reshape(-1)), dim)})
    kinds = np.asarray(["regular", "minority", "noisy"])[g.kind]
    truth = pa.table({C.USER_ID: pa.array(ids.astype(str)), "type": pa.array(kinds),
                      "pairs": pa.array(np.bincount(g.user, minlength=len(ids))),
                      "oracle_test_accuracy": pa.array(g.oracle.astype(np.float32))})
    with storage.atomic_output(out, "synth", overwrite=overwrite) as staging:
        writer = storage.PartWriter(staging, table.schema)
        writer.write(table)
        writer.close()
        storage.write_staged(truth, storage.join(staging, TRUTH_DIR))
    return g


def read_truth(embeddings_uri: str) -> pa.Table | None:
    """The ground-truth users table of a synthetic population, or None."""
    uri = storage.join(embeddings_uri, TRUTH_DIR)
    if not storage.exists(uri):
        return None
    return storage.read_table(uri)


# --- CLI ----------------------------------------------------------------------------
def synth(out: str, users: int | None = None, pairs_per_user: int = 20, kind: str = "embedding",
          dim: int | None = None, dtype: str = "float32", seed: int = 0, population: str | None = None,
          overwrite: bool = False) -> dict:
    """Write a synthetic population to `out`; returns its summary.

    kind embedding: an embeddings table (train on it directly); text: a pairs
    table for `mrm embed`; text-hard: the same over relations a frozen encoder does not
    carry linearly; text-order: over arrangements of the same sentences (mrm_ray.synth_text).
    population: one of the quality zoo (mrm_ray.zoo) instead; users/dim then change its
    size only when given.
    """
    from mrm_ray.errors import UserError
    from mrm_ray.synth_text import SCHEMES
    if (users is not None and users < 1) or pairs_per_user < 1 or (dim is not None and dim < 4):
        raise UserError("--users and --pairs-per-user must be >= 1 and --dim >= 4")
    if kind not in ("embedding", *SCHEMES):
        raise UserError(f"--kind must be one of embedding, {', '.join(SCHEMES)}")
    storage.check_output(out, "synth", overwrite=overwrite)   # before any work
    if population is not None:
        from mrm_ray import zoo
        if population not in zoo.ZOO:
            raise UserError(f"unknown population {population!r}; known: {', '.join(zoo.ZOO)}")
        g = write_zoo_population(out, population, users=users, dim=dim, seed=seed, overwrite=overwrite)
        return {"population": population, "users": g.spec.users, "pairs": len(g.user), "dim": g.spec.dim,
                "out": out}
    users = 2000 if users is None else users
    if kind in SCHEMES:
        from mrm_ray.synth_text import write_text_population
        return write_text_population(out, users=users, pairs_per_user=pairs_per_user, seed=seed,
                                     overwrite=overwrite, kind=kind)
    return write_embedding_population(out, users, pairs_per_user, 64 if dim is None else dim, seed,
                                      dtype=dtype, overwrite=overwrite)
