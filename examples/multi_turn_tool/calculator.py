"""Multi-turn tool use: a calculator tool, as a slime-style custom generate function.

Use with `--custom-generate-function-path examples.multi_turn_tool.calculator.generate`.

The model writes `<tool>12*7</tool>` to call the tool; generation stops at `</tool>`, the expression is
evaluated safely (an `ast` walk over numbers and arithmetic, no `eval`), `<result>84</result>` is
appended with loss mask 0 and log-prob 0 (the policy did not produce it), and generation continues
until the model answers without a tool call, the token budget is spent, or `--max-tool-turns`
(default 4) tool calls were made.
"""

from __future__ import annotations

import ast
import operator
import re
from typing import Any

from miles.rollout.generate import call_generate, get_tokenizer, parse_generate_output
from miles.rollout.sample import Sample

TOOL_CALL = re.compile(r"<tool>(.*?)</tool>\s*$", re.S)

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression (numbers, + - * / // % **, parentheses); errors become text."""
    if len(expression) > 200:
        return "error: expression too long"

    def walk(node: ast.AST) -> float | int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
                raise ValueError("exponent too large")
            return _BINOPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](walk(node.operand))
        raise ValueError(f"unsupported syntax: {type(node).__name__}")

    try:
        value = walk(ast.parse(expression.strip(), mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError) as e:
        return f"error: {e}"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


async def generate(args: Any, sample: Sample, sampling_params: dict) -> Sample:
    """slime signature: generate turns, run tool calls, mask tool output out of the loss."""
    tokenizer = get_tokenizer(args)
    if not sample.tokens:
        sample.tokens = list(tokenizer(sample.prompt, add_special_tokens=False)["input_ids"])
    params = dict(sampling_params)
    params["stop"] = ["</tool>"] + list(params.get("stop") or [])
    budget = params["max_new_tokens"] - sample.response_length
    max_turns = getattr(args, "max_tool_turns", 4)
    tool_calls = 0
    while True:
        if budget <= 0:
            sample.status = Sample.Status.TRUNCATED
            break
        params["max_new_tokens"] = budget
        ids, logprobs, text, meta = parse_generate_output(await call_generate(args, sample.tokens, params))
        sample.append_response_tokens(ids, logprobs, trainable=True, text=text, meta_info=meta)
        budget -= len(ids)
        call = TOOL_CALL.search(text)
        if sample.status != Sample.Status.COMPLETED or call is None:
            break  # final answer, truncated or aborted
        if tool_calls >= max_turns:
            break
        tool_calls += 1
        observation = f"<result>{calculate(call.group(1))}</result>"
        obs_ids = list(tokenizer(observation, add_special_tokens=False)["input_ids"])
        sample.append_response_tokens(obs_ids, trainable=False, text=observation)
        budget -= len(obs_ids)
    sample.metadata["tool_calls"] = tool_calls
    return sample
