"""Rule-based rewards on (response text, label): math, boxed, exact, f1."""

from __future__ import annotations

import logging
import re
import string
import threading
from collections import Counter


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced; None if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def _timeouts() -> tuple[dict, dict]:
    # math-verify's own timeouts use SIGALRM, which only works in the main thread; elsewhere the reward
    # executor's --rm-timeout bounds the call, so silence math-verify's warning about it.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    main = threading.current_thread() is threading.main_thread()
    return {"parsing_timeout": 5 if main else None}, {"timeout_seconds": 5 if main else None}


def math_equal(pred: str, gold: str) -> bool:
    """math-verify equivalence of two answers (latex or plain expressions)."""
    from math_verify import parse, verify

    ptime, vtime = _timeouts()
    gold_p = parse(gold if "$" in gold or "\\boxed" in gold else f"${gold}$", **ptime)
    if not gold_p:
        gold_p = parse(gold, **ptime)
    pred_p = parse(pred, **ptime)
    if not gold_p or not pred_p:
        return False
    return bool(verify(gold_p, pred_p, **vtime))


def math_reward(response: str, label: str) -> float:
    """1.0 if math-verify finds the response's answer equal to the label, else 0.0."""
    if label is None:
        raise ValueError("math reward needs a label (--label-key)")
    return 1.0 if math_equal(response, str(label)) else 0.0


def boxed_reward(response: str, label: str) -> float:
    """1.0 if the last \\boxed{} of the response equals the label (label's own \\boxed stripped), else 0.0."""
    if label is None:
        raise ValueError("boxed reward needs a label (--label-key)")
    pred = last_boxed(response)
    if pred is None:
        return 0.0
    gold = last_boxed(str(label)) or str(label)
    if pred.strip() == gold.strip():
        return 1.0
    return 1.0 if math_equal(f"${pred}$", gold) else 0.0


def _norm_ws(s: str) -> str:
    return " ".join(str(s).split())


def exact_reward(response: str, label: str) -> float:
    """1.0 if response and label are equal up to surrounding/repeated whitespace."""
    return 1.0 if _norm_ws(response) == _norm_ws(label) else 0.0


def normalize_answer(s: str) -> str:
    """SQuAD normalization: lower case, drop punctuation and articles, collapse whitespace."""
    s = str(s).lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1_reward(response: str, label: str) -> float:
    """SQuAD token F1 between normalized response and label (yes/no/noanswer must match exactly)."""
    pred, gold = normalize_answer(response), normalize_answer(label)
    if pred in ("yes", "no", "noanswer") or gold in ("yes", "no", "noanswer"):
        return 1.0 if pred == gold else 0.0
    p_toks, g_toks = pred.split(), gold.split()
    common = sum((Counter(p_toks) & Counter(g_toks)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p_toks), common / len(g_toks)
    return 2 * precision * recall / (precision + recall)


RULES = {"math": math_reward, "boxed": boxed_reward, "exact": exact_reward, "f1": f1_reward}


def get_rule(rm_type: str):
    """The rule function for `rm_type`; `boxed_<type>` applies `<type>` to the last \\boxed{} content."""
    if rm_type in RULES:
        return RULES[rm_type]
    if rm_type.startswith("boxed_") and rm_type[6:] in RULES:
        inner = RULES[rm_type[6:]]

        def boxed_then(response: str, label: str) -> float:
            pred = last_boxed(response)
            return 0.0 if pred is None else inner(pred, label)

        return boxed_then
    raise ValueError(f"unknown --rm-type {rm_type!r}; built-ins: {sorted(RULES)} + remote, boxed_<type>")
