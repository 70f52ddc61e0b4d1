"""Function calling for templates without tool support: describe tools to a model, parse calls out of its text."""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from sovereign.engine.requests import ToolCall
from sovereign.errors import InvalidRequest

# Hermes / Qwen style, which many GGUF templates teach their models.
_TAGGED_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)
# Text that may be the start of a tool call: hold it back from the stream until we know.
CALL_OPENINGS = ("{", "[", "<tool_call>", "```")


def function_tool(name: str, description: str | None, parameters: dict[str, Any]) -> dict[str, Any]:
    """A tool in the engine's (OpenAI chat) shape, from the parts every API's tool definition has."""
    function: dict[str, Any] = {"name": name}  # in the order OpenAI's clients write them
    if description:
        function["description"] = description
    function["parameters"] = parameters
    return {"type": "function", "function": function}


def functions_of(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The `function` objects of OpenAI tools, checked for the fields we rely on."""
    functions = []
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            tool.get("type", "function") != "function"
            or not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
        ):
            raise InvalidRequest(
                f"tools[{index}] must be {{'type': 'function', 'function': {{'name': …}}}}", f"tools[{index}]"
            )
        functions.append(function)
    return functions


def template_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tools as templates read them: as the client wrote them, but every function with a description and parameters.

    Templates render tools as JSON, and a model was trained on its clients' key order: the keys a client
    sent keep their order. Many templates read both fields unguarded, so one that is missing is added
    after the others.
    """
    prepared = []
    for tool, function in zip(tools, functions_of(tools), strict=True):
        if "description" in function and "parameters" in function:
            prepared.append(tool)
            continue
        filled = dict(function)
        filled.setdefault("description", "")
        filled.setdefault("parameters", {"type": "object", "properties": {}})
        prepared.append({**tool, "function": filled})
    return prepared


def instructions(tools: list[dict[str, Any]]) -> str:
    """A system-prompt paragraph teaching a template without tool support how to call ours."""
    described = [
        {"name": f["name"], "description": f.get("description", ""), "parameters": f.get("parameters", {})}
        for f in functions_of(tools)
    ]
    return (
        "You can call functions. To call one, reply with only a JSON object of the form "
        '{"name": "<function name>", "arguments": {<arguments>}} and nothing else.\n'
        "Available functions:\n" + json.dumps(described, ensure_ascii=False, indent=1)
    )


def new_call_id() -> str:
    """An id in OpenAI's style."""
    return "call_" + secrets.token_hex(12)


def parse_calls(text: str, tools: list[dict[str, Any]]) -> list[ToolCall]:
    """Tool calls in a model's output, or [] when the text is not (only) a call to a known function."""
    known = {f["name"] for f in functions_of(tools)}
    stripped = text.strip()
    fenced = _FENCE.match(stripped)
    if fenced:
        stripped = fenced.group(1)
    candidates = _TAGGED_CALL.findall(stripped) if "<tool_call>" in stripped else [stripped]
    calls: list[ToolCall] = []
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except ValueError:
            return []
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, dict) or item.get("name") not in known:
                return []
            arguments = item.get("arguments", item.get("parameters", {}))
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except ValueError:
                    return []
            if not isinstance(arguments, dict):
                return []
            calls.append(ToolCall(new_call_id(), item["name"], json.dumps(arguments, ensure_ascii=False)))
    return calls


def as_template_messages(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]], native: bool
) -> list[dict[str, Any]]:
    """Messages a template can render: tool turns folded into plain turns when it has no tool support."""
    if native:
        # Hugging Face templates expect arguments as a mapping, not OpenAI's JSON string.
        result = []
        for message in messages:
            if message.get("tool_calls"):
                calls = [
                    {
                        **call,
                        "function": {
                            **call["function"],
                            "arguments": _loads_or_keep(call["function"].get("arguments", "{}")),
                        },
                    }
                    for call in message["tool_calls"]
                ]
                message = {**message, "tool_calls": calls}
            result.append(message)
        return result
    folded: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "tool":
            folded.append({"role": "user", "content": f"Function result: {message.get('content', '')}"})
        elif role == "assistant" and message.get("tool_calls"):
            calls = [
                {"name": c["function"]["name"], "arguments": _loads_or_keep(c["function"].get("arguments", "{}"))}
                for c in message["tool_calls"]
            ]
            folded.append(
                {"role": "assistant", "content": json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)}
            )
        else:
            folded.append(message)
    if tools:
        guide = instructions(tools)
        if folded and folded[0].get("role") == "system":
            folded[0] = {**folded[0], "content": f"{folded[0]['content']}\n\n{guide}"}
        else:
            folded.insert(0, {"role": "system", "content": guide})
    return _merge_same_role(folded)


def _merge_same_role(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Join consecutive turns of one role (strict templates demand user/assistant alternation)."""
    merged: list[dict[str, Any]] = []
    for message in messages:
        if (
            merged
            and merged[-1]["role"] == message["role"]
            and message["role"] in ("user", "assistant")
            and isinstance(merged[-1].get("content"), str)
            and isinstance(message.get("content"), str)
        ):
            merged[-1] = {**merged[-1], "content": merged[-1]["content"] + "\n\n" + message["content"]}
        else:
            merged.append(message)
    return merged


def _loads_or_keep(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text
