"""Synthetic text populations with known ground truth (`mrm synth --kind text|text-hard`).

Every response to a prompt is written from five binary style attributes:

  long      5 points instead of 2
  formal    "It is advisable to ..." instead of "Just ..., honestly."
  list      a numbered list instead of prose
  polite    a thank-you opener and a helpful closer
  detailed  an example after every point

A user's true reward is linear in those attributes, r_u(text) = w_u . a(text),
and w_u = the prototype of the user's latent type + personal noise.  A few
types (concise, thorough, friendly, and a minority "structured" type) make the
population clustered, so a meta-learned prior helps, while the minority and
the personal noise keep some users hard.  The attributes are plain surface
features, so a small sentence encoder (all-MiniLM-L6-v2) embeds them in
linearly separable directions: the MRM model (linear heads on the embedding)
can learn them.  Labels are sampled Bradley-Terry style,
P(a preferred over b) = sigmoid(beta * w_u . (a - b)).

`--kind text-hard` is the same kind of population over attributes a frozen
mean-pooled encoder does NOT carry linearly (HARD_ATTRIBUTES): each request
asks, in a formal or a casual voice, for a brief or a thorough answer, and a
user may care whether the response gives the length asked for, answers in the
request's voice, and keeps one register from its opener to its body.  Each is
a relation (an XOR of two features that are drawn at random); only `polite` (a
closing line) is a plain surface feature.  benchmarks/finetune.py --kind
text-hard measures how visible each attribute is (a linear probe) before and
after `mrm finetune`: on all-MiniLM-L6-v2, follows_length and consistent
barely (0.53, 0.71), mirrors_tone well (0.94, attention mixes the voices).

`--kind text-order` is a third: its attributes (ORDER_ATTRIBUTES) but `polite` only arrange the same
sentences (the summary before or after the advice, each example before or after its point, the question
restated first or last), so a response's bag of words does not show them.  A linear probe does find them
in the frozen embedding (0.95-1.00); MRM on it does not (the content differences of a pair dominate).

Written under `out` (one atomic commit):
  part-00000.parquet          the pairs table (contract columns; split train/test 50/50 per user)
  _truth/part-00000.parquet   per user: type, weights, pairs, oracle_test_accuracy (how often the true
                              w_u agrees with the sampled labels on the user's test pairs)
  _truth_pairs/part-00000.parquet  per pair: attributes of both responses, oracle margin, label agrees
  _truth.json                 attribute names, type prototypes, generation settings
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mrm_ray.data import contract as C
from mrm_ray.data import storage

ATTRIBUTES = ("long", "formal", "list", "polite", "detailed")
# name -> (share of users, prototype weights over ATTRIBUTES)
TYPES = {
    "concise":    (0.35, [-1.2, 0.0, -0.6, 0.3, -0.6]),
    "thorough":   (0.30, [1.0, 0.6, 0.4, 0.0, 1.2]),
    "friendly":   (0.25, [0.0, -1.2, -0.5, 1.2, 0.3]),
    "structured": (0.10, [0.4, 0.8, 1.4, -0.6, 0.4]),  # the minority: hard to learn from the others
}

# topic: (question, [(point, example), ...]); a point reads after "to"/"you" as a verb phrase.
TOPICS = {
    "running": ("How should I start running?", [
        ("begin with short, easy runs", "twenty minutes at a pace where you can still talk"),
        ("buy comfortable running shoes", "a pair fitted at a local running store"),
        ("run three times a week", "Monday, Wednesday and Saturday mornings"),
        ("increase your distance slowly", "adding no more than ten percent each week"),
        ("rest when your legs feel sore", "taking a full day off after a long run")]),
    "saving": ("How can I save more money each month?", [
        ("track every expense", "a simple spreadsheet with one row per purchase"),
        ("set up an automatic transfer to savings", "moving fifty dollars on every payday"),
        ("cook at home more often", "preparing lunches on Sunday for the whole week"),
        ("cancel subscriptions you rarely use", "the streaming service you opened once this year"),
        ("compare prices before big purchases", "checking three shops before buying a laptop")]),
    "sleep": ("What can I do to sleep better?", [
        ("go to bed at the same time every night", "lights out at eleven, even on weekends"),
        ("avoid screens before bed", "putting the phone away an hour before sleep"),
        ("keep the bedroom cool and dark", "blackout curtains and a room at eighteen degrees"),
        ("limit coffee after lunch", "switching to herbal tea in the afternoon"),
        ("get some sunlight in the morning", "a ten minute walk right after breakfast")]),
    "python": ("How do I learn Python programming?", [
        ("write a little code every day", "solving one small exercise each evening"),
        ("build a small project you care about", "a script that renames your holiday photos"),
        ("read other people's code", "browsing a popular open source library"),
        ("learn to use the debugger", "stepping through a loop to see each value"),
        ("ask questions in a community", "posting a clear question on a programming forum")]),
    "garden": ("How do I keep my houseplants alive?", [
        ("water only when the soil is dry", "pushing a finger into the soil before watering"),
        ("place plants near bright indirect light", "a spot a metre away from a sunny window"),
        ("use pots with drainage holes", "a terracotta pot with a saucer underneath"),
        ("feed them during the growing season", "a diluted fertilizer once a month in spring"),
        ("remove dead leaves regularly", "trimming yellow leaves with clean scissors")]),
    "interview": ("How should I prepare for a job interview?", [
        ("research the company beforehand", "reading its recent news and product pages"),
        ("practise answers to common questions", "rehearsing why you want the role out loud"),
        ("prepare questions for the interviewer", "asking how the team measures success"),
        ("plan your route and arrive early", "leaving home twenty minutes sooner than needed"),
        ("send a thank you note afterwards", "a short email on the same evening")]),
    "cooking": ("How can I get better at cooking?", [
        ("learn a few basic knife skills", "dicing an onion evenly and safely"),
        ("follow simple recipes first", "a tomato pasta with five ingredients"),
        ("taste your food while cooking", "adding salt little by little to the sauce"),
        ("keep a well stocked pantry", "rice, beans, spices and olive oil at hand"),
        ("cook with friends or family", "a weekly dinner where everyone makes one dish")]),
    "language": ("What is the best way to learn a new language?", [
        ("practise speaking from the first week", "a short conversation with a tutor online"),
        ("learn the most common words first", "the top five hundred words of the language"),
        ("listen to native speakers daily", "a podcast during your commute"),
        ("review vocabulary with spaced repetition", "flashcards that return just before you forget"),
        ("read simple books", "children's stories with pictures")]),
    "focus": ("How can I focus better when working from home?", [
        ("set up a dedicated workspace", "a desk that you only use for work"),
        ("work in focused blocks", "fifty minutes of work followed by a short break"),
        ("turn off notifications", "muting chat apps during deep work"),
        ("plan the day the evening before", "writing three priorities on a sticky note"),
        ("take a real lunch break", "eating away from the screen")]),
    "travel": ("How do I plan a trip on a budget?", [
        ("book flights well in advance", "searching two months before the departure date"),
        ("travel outside the peak season", "visiting the coast in late September"),
        ("stay in guesthouses or hostels", "a family run guesthouse near the old town"),
        ("use public transport", "a weekly metro pass instead of taxis"),
        ("eat where the locals eat", "a small market stall away from the main square")]),
    "stress": ("How can I handle stress at work?", [
        ("break big tasks into small steps", "splitting a report into outline, draft and review"),
        ("take short walks during the day", "a five minute walk around the building"),
        ("talk to your manager about workload", "a weekly check in about priorities"),
        ("protect your evenings", "not reading work email after seven"),
        ("practise slow breathing", "breathing in for four counts and out for six")]),
    "fitness": ("How do I build a simple home workout routine?", [
        ("start with bodyweight exercises", "squats, push ups and planks"),
        ("warm up before every session", "five minutes of jumping jacks and stretches"),
        ("train three days a week", "short sessions on alternate days"),
        ("track your progress", "writing down repetitions after every workout"),
        ("increase the difficulty gradually", "adding two repetitions each week")]),
}

_FORMAL = ("It is advisable to {p}.", "I would recommend that you {p}.", "Furthermore, it is important to {p}.")
_CASUAL = ("Just {p}, honestly.", "You gotta {p}, trust me.", "Also, {p}, it's pretty easy.")
_EXAMPLE = {True: "For instance, consider {e}.", False: "Like, {e}."}
_OPENER = {True: "Thank you for your question.", False: "Thanks so much for asking!"}
_CLOSER = {True: "I hope this is helpful; please let me know if you have any further questions.",
           False: "Hope that helps, good luck!"}


def render_response(topic: str, attrs, rng: np.random.Generator) -> str:
    """The text of one response to TOPICS[topic] with the given 0/1 attributes (order of ATTRIBUTES)."""
    long, formal, as_list, polite, detailed = (bool(a) for a in attrs)
    points = TOPICS[topic][1]
    chosen = rng.permutation(len(points))[: 5 if long else 2]
    templates = _FORMAL if formal else _CASUAL
    items = []
    for k, i in enumerate(chosen):
        point, example = points[i]
        sentence = templates[k % len(templates)].format(p=point)
        if detailed:
            sentence += " " + _EXAMPLE[formal].format(e=example)
        items.append(sentence)
    body = "\n".join(f"{k + 1}. {s}" for k, s in enumerate(items)) if as_list else " ".join(items)
    if polite:
        sep = "\n" if as_list else " "  # a list keeps its lines; prose stays one paragraph
        body = f"{_OPENER[formal]}{sep}{body}{sep}{_CLOSER[formal]}"
    return body


def sample_users(n: int, rng: np.random.Generator, n_types: int = len(TYPES), personal: float = 0.3,
                 types: dict = TYPES):
    """(type index per user, true weights (n, K)): prototype of the type + personal noise."""
    names = list(types)[:n_types]
    shares = np.array([types[t][0] for t in names])
    kind = rng.choice(len(names), size=n, p=shares / shares.sum())
    protos = np.array([types[t][1] for t in names])
    return kind, protos[kind] + personal * rng.standard_normal((n, protos.shape[1]))


# --- the hard population --------------------------------------------------------------------------
# Each attribute but `polite` is a relation: between the request and the response, or between two parts
# of the response.  Either side alone is drawn at random, so no direction of a (near-additive) frozen
# embedding tells a response that has the attribute from one that has not.
HARD_ATTRIBUTES = ("polite", "follows_length", "mirrors_tone", "consistent")
HARD_TYPES = {
    "literal":  (0.35, [0.3, 1.4, 0.2, 0.4]),     # does what was asked
    "mirror":   (0.30, [0.0, 0.3, 1.4, 0.6]),     # wants to be answered in their own tone
    "stickler": (0.25, [0.6, 0.2, -0.4, 1.4]),    # one register throughout
    "contrary": (0.10, [-0.8, -1.0, 0.6, -0.4]),  # the minority
}
# the request's register x the length it asks for
_REQUEST = {(True, True): "Could you please advise me? {q} A thorough answer would be appreciated.",
            (True, False): "Could you please advise me? {q} A brief answer would be appreciated.",
            (False, True): "hey, quick q: {q} go into detail pls",
            (False, False): "hey, quick q: {q} keep it short pls"}


def render_hard_prompt(topic: str, rng: np.random.Generator) -> tuple[str, tuple[bool, bool]]:
    """A request about TOPICS[topic] in a random register asking for a random length: (text, (formal, long))."""
    formal, wants_long = bool(rng.integers(2)), bool(rng.integers(2))
    return _REQUEST[formal, wants_long].format(q=TOPICS[topic][0]), (formal, wants_long)


def render_hard_response(topic: str, attrs, rng: np.random.Generator, request: tuple[bool, bool]) -> str:
    """The text of one response to a render_hard_prompt request with the given 0/1 HARD_ATTRIBUTES:
    follows_length gives the length asked for (4 points or 2), mirrors_tone answers in the request's
    register, consistent opens (and closes) in the register of the body, polite adds the closer."""
    polite, follows_length, mirrors_tone, consistent = (bool(a) for a in attrs)
    asked_formal, asked_long = request
    body_formal = asked_formal == mirrors_tone
    opener_formal = body_formal == consistent
    points = TOPICS[topic][1]
    chosen = rng.permutation(len(points))[: 4 if asked_long == follows_length else 2]
    templates = _FORMAL if body_formal else _CASUAL
    items = [templates[k % len(templates)].format(p=points[i][0]) for k, i in enumerate(chosen)]
    return " ".join([_OPENER[opener_formal], *items, *([_CLOSER[opener_formal]] if polite else [])])


# --- the order population -------------------------------------------------------------------------
# Every response holds the same kinds of sentences; the attributes but `polite` only ARRANGE them, so a bag of
# words does not show them.  Measured (benchmarks/finetune.py --kind text-order): all-MiniLM-L6-v2's mean-pooled
# embedding does carry them per response (linear probes 0.95-1.00), but they are small directions next to the
# content a pair's two responses differ in, and MRM on the frozen embedding does not find them from few pairs.
ORDER_ATTRIBUTES = ("polite", "summary_first", "example_first", "restate_first")
ORDER_TYPES = {
    "skimmer":   (0.35, [0.3, 1.4, 0.2, -0.3]),    # the bottom line up front
    "learner":   (0.30, [0.4, -0.4, 1.4, 0.2]),    # the example before the advice
    "formalist": (0.25, [0.6, 0.3, -0.2, 1.4]),    # the question restated before the answer
    "contrary":  (0.10, [-0.8, -1.0, -0.6, -0.4]),  # the minority
}


def render_order_response(topic: str, attrs, rng: np.random.Generator) -> str:
    """The text of one response to TOPICS[topic] with the given 0/1 ORDER_ATTRIBUTES: two points drawn at
    random with their examples, a one-line summary, a restatement of the question; summary_first puts the
    summary before the points (else after), example_first each example before its point (else after),
    restate_first the restatement at the start (else at the end), polite adds a closing line."""
    polite, summary_first, example_first, restate_first = (bool(a) for a in attrs)
    question, points = TOPICS[topic]
    chosen = [points[i] for i in rng.permutation(len(points))[:2]]
    restate = f"You asked: {question}"
    summary = f"In short, {chosen[0][0]}."
    body = []
    for k, (point, example) in enumerate(chosen):
        advice, instance = _FORMAL[k % len(_FORMAL)].format(p=point), _EXAMPLE[True].format(e=example)
        body += [instance, advice] if example_first else [advice, instance]
    body = [summary, *body] if summary_first else [*body, summary]
    texts = [restate, *body] if restate_first else [*body, restate]
    return " ".join([*texts, *([_CLOSER[True]] if polite else [])])


def _plain_prompt(topic: str, rng: np.random.Generator) -> tuple[str, None]:
    return TOPICS[topic][0], None


# name -> (attributes, types, render the prompt -> (text, context), render a response given the context)
SCHEMES = {"text": (ATTRIBUTES, TYPES, _plain_prompt, lambda topic, attrs, rng, _: render_response(topic, attrs, rng)),
           "text-hard": (HARD_ATTRIBUTES, HARD_TYPES, render_hard_prompt, render_hard_response),
           "text-order": (ORDER_ATTRIBUTES, ORDER_TYPES, _plain_prompt,
                          lambda topic, attrs, rng, _: render_order_response(topic, attrs, rng))}


def _attribute_pair(w: np.ndarray, rng: np.random.Generator, min_margin: float):
    """Two attribute vectors whose true utilities differ by at least min_margin (clear-cut pairs)."""
    for _ in range(100):
        a, b = rng.integers(0, 2, (2, len(w)))
        if abs(float(w @ (a - b))) >= min_margin:
            return a, b
    return a, b  # a user with ~zero weights: every pair is a coin flip anyway


def generate(users: int, pairs_per_user: int, seed: int = 0, n_types: int = len(TYPES), beta: float = 3.0,
             personal: float = 0.3, min_margin: float = 0.3, kind: str = "text"):
    """(pairs rows, per-user truth rows, per-pair truth rows) as lists of dicts; same seed, same output."""
    attributes, types, render_prompt, render = SCHEMES[kind]
    rng = np.random.default_rng(seed)
    user_type, weights = sample_users(users, rng, n_types, personal, types)
    names, topics = list(types), list(TOPICS)
    pairs, user_truth, pair_truth = [], [], []
    n_train = (pairs_per_user + 1) // 2
    for u in range(users):
        uid, w = f"user{u:06d}", weights[u]
        agree_test = []
        for j in range(pairs_per_user):
            topic = topics[rng.integers(len(topics))]
            a, b = _attribute_pair(w, rng, min_margin)
            prompt, context = render_prompt(topic, rng)
            text_a, text_b = render(topic, a, rng, context), render(topic, b, rng, context)
            margin = float(w @ (a - b))
            a_wins = rng.random() < 1.0 / (1.0 + np.exp(-beta * margin))
            (ch, ca), (rj, ra) = ((text_a, a), (text_b, b)) if a_wins else ((text_b, b), (text_a, a))
            pid, split = f"{uid}-{j:04d}", C.TRAIN if j < n_train else C.TEST
            pairs.append({C.USER_ID: uid, C.PAIR_ID: pid, C.CONV_ID: pid, C.SPLIT: split,
                          C.PROMPT: [{"role": "user", "content": prompt}], C.CHOSEN: ch, C.REJECTED: rj})
            agrees = (margin > 0) == a_wins
            pair_truth.append({C.USER_ID: uid, C.PAIR_ID: pid, "chosen_attrs": ca.tolist(),
                               "rejected_attrs": ra.tolist(), "oracle_margin": abs(margin) * (1 if agrees else -1),
                               "label_agrees": agrees})
            if split == C.TEST:
                agree_test.append(agrees)
        user_truth.append({C.USER_ID: uid, "type": names[user_type[u]], "weights": w.astype(np.float32).tolist(),
                           "pairs": pairs_per_user,
                           "oracle_test_accuracy": float(np.mean(agree_test)) if agree_test else 1.0})
    return pairs, user_truth, pair_truth


def write_text_population(out_uri: str, users: int = 200, pairs_per_user: int = 20, seed: int = 0,
                          n_types: int = len(TYPES), beta: float = 3.0, personal: float = 0.3,
                          min_margin: float = 0.3, overwrite: bool = False, kind: str = "text") -> dict:
    """Write the pairs table and its ground truth under out_uri (atomically); return a summary."""
    pairs, user_truth, pair_truth = generate(users, pairs_per_user, seed, n_types, beta, personal, min_margin, kind)
    attributes, types = SCHEMES[kind][:2]
    k = len(attributes)
    pairs_table = C.normalize_pairs(pa.Table.from_pylist(pairs, schema=pa.schema([
        (C.USER_ID, pa.string()), (C.PAIR_ID, pa.string()), (C.CONV_ID, pa.string()), (C.SPLIT, pa.string()),
        (C.PROMPT, C.PROMPT_TYPE), (C.CHOSEN, pa.string()), (C.REJECTED, pa.string())])))
    users_table = pa.Table.from_pylist(user_truth, schema=pa.schema([
        (C.USER_ID, pa.string()), ("type", pa.string()), ("weights", pa.list_(pa.float32(), k)),
        ("pairs", pa.int64()), ("oracle_test_accuracy", pa.float32())]))
    pairs_truth = pa.Table.from_pylist(pair_truth, schema=pa.schema([
        (C.USER_ID, pa.string()), (C.PAIR_ID, pa.string()), ("chosen_attrs", pa.list_(pa.int8(), k)),
        ("rejected_attrs", pa.list_(pa.int8(), k)), ("oracle_margin", pa.float32()), ("label_agrees", pa.bool_())]))
    meta = {"kind": kind, "attributes": list(attributes),
            "types": {t: {"share": s, "prototype": p} for t, (s, p) in list(types.items())[:n_types]},
            "users": users, "pairs_per_user": pairs_per_user, "seed": seed, "beta": beta, "personal": personal,
            "min_margin": min_margin}
    with storage.atomic_output(out_uri, "synth", overwrite=overwrite) as staging:
        fs, path = storage.resolve(staging)
        for table, rel in ((pairs_table, "part-00000.parquet"), (users_table, "_truth/part-00000.parquet"),
                           (pairs_truth, "_truth_pairs/part-00000.parquet")):
            fs.create_dir(f"{path}/{rel}".rsplit("/", 1)[0], recursive=True)
            pq.write_table(table, f"{path}/{rel}", filesystem=fs)
        with fs.open_output_stream(f"{path}/_truth.json") as f:
            f.write((json.dumps(meta, indent=2) + "\n").encode())
    oracle = float(np.mean([u["oracle_test_accuracy"] for u in user_truth])) if user_truth else 0.0
    return {"users": users, "pairs": len(pairs), "kind": kind, "oracle_test_accuracy": round(oracle, 4),
            "out": out_uri}
