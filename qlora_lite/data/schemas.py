"""Record schemas: detect which one a record has, and turn it into the one form we tokenize.

Every record becomes ``{"text": str}`` (plain language modelling) or ``{"messages": [{"role",
"content"}, ...]}`` (a chat, rendered through the tokenizer's chat template). The schemas users
arrive with, and what each becomes:

    text                {"text"}                                         → text
    alpaca              {"instruction", "input" (optional), "output",    → system? + user + assistant
                         "system" (optional)}
    sharegpt            {"conversations": [{"from", "value"}, ...]}      → messages; roles human→user,
                                                                           gpt→assistant, system→system
    messages            {"messages": [{"role", "content"}, ...]}         → itself (OpenAI style)
    prompt_completion   {"prompt", "completion"}: strings, or lists of   → user + assistant (strings), or
                         messages (TRL's conversational form)              prompt + completion messages

``data_format: auto`` detects the schema per record from its (non-null) keys, so one file may mix
them; naming a format makes every record use it. ``columns`` renames: ``{"instruction": "question"}``
reads the alpaca ``instruction`` from the column ``question``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError, DataError

__all__ = ["FORMATS", "ROLES", "SHAREGPT_ROLES", "FIELDS", "detect_format", "to_canonical", "check_columns"]

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
# Canonical field names per schema (required first); `columns` may rename any of them.
FIELDS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "alpaca": ("instruction", "output", "input", "system"),
    "sharegpt": ("conversations",),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
}
FORMATS = ("auto", *FIELDS)
# Detection order: the key that identifies each schema (a record with two of them is ambiguous).
_MARKERS = (("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "alpaca"),
            ("prompt", "prompt_completion"), ("text", "text"))
_SHAPES = ('{"text"}, {"instruction", "input"?, "output"}, {"conversations": [{"from", "value"}]}, '
           '{"messages": [{"role", "content"}]} or {"prompt", "completion"}')


def check_columns(columns: Mapping[str, str] | None, data_format: str = "auto") -> list[str]:
    """Problems with a `columns` remapping / `data_format` (for the config's aggregated error)."""
    problems = []
    if data_format not in FORMATS:
        problems.append(f"data_format={data_format!r} must be one of {', '.join(FORMATS)}")
    if columns is None:
        return problems
    if not isinstance(columns, Mapping):
        return [*problems, f"columns={columns!r} must map our field names to your column names"]
    known = sorted({f for fields in FIELDS.values() for f in fields})
    for ours, theirs in columns.items():
        if ours not in known:
            problems.append(f"columns: {ours!r} is not a field we read; rename one of {', '.join(known)}")
        if not isinstance(theirs, str) or not theirs:
            problems.append(f"columns: {ours!r} must name a column (a non-empty string), got {theirs!r}")
    return problems


def _present(record: Mapping[str, Any]) -> list[str]:
    """Keys with a value: Arrow tables fill a file's absent keys with None."""
    return sorted(k for k, v in record.items() if v is not None)


def _renamed(record: Mapping[str, Any], columns: Mapping[str, str] | None) -> dict[str, Any]:
    if not columns:
        return dict(record)
    theirs = set(columns.values())
    view = {k: v for k, v in record.items() if k not in theirs}
    view.update({ours: record.get(col) for ours, col in columns.items()})
    return view


def detect_format(record: Mapping[str, Any], where: str) -> str:
    """The schema of one (renamed) record, from its non-null keys."""
    keys = _present(record)
    found = [fmt for key, fmt in _MARKERS if key in keys]
    if not found:
        raise DataError(f"{where}: keys {keys} match no known record shape; use {_SHAPES} "
                        "(or map your columns with `columns:`)")
    if len(found) > 1:
        raise DataError(f"{where}: keys {keys} belong to different record shapes ({', '.join(found)}); keep one, "
                        "or pick one with `data_format:`")
    return found[0]


def _need_str(record: Mapping[str, Any], key: str, where: str, allow_empty: bool = False) -> str:
    value = record.get(key)
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        kind = "a string" if allow_empty else "a non-empty string"
        raise DataError(f"{where}: {key!r} must be {kind}, got {value!r:.60} (keys {_present(record)})")
    return value


def _check_chat(messages: Any, where: str, key: str = "messages") -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: {key!r} must be a non-empty list of {{'role', 'content'}} objects")
    for j, message in enumerate(messages):
        if not isinstance(message, Mapping) or message.get("role") is None or message.get("content") is None:
            raise DataError(f"{where}: {key}[{j}] must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise DataError(f"{where}: {key}[{j}] has role {message['role']!r}; allowed roles: {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise DataError(f"{where}: {key}[{j}]['content'] must be a string")
    if messages[0]["role"] == "assistant":
        raise DataError(f"{where}: the chat starts with an assistant message; start with a user/system one")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the chat has no assistant message, so nothing to train on")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _sharegpt(turns: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of {{'from', 'value'}} objects")
    messages = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or turn.get("from") is None or turn.get("value") is None:
            raise DataError(f"{where}: conversations[{j}] must be an object with 'from' and 'value'")
        if turn["from"] not in SHAREGPT_ROLES:
            raise DataError(f"{where}: conversations[{j}] is from {turn['from']!r}; allowed: "
                            f"{', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return _check_chat(messages, where, "conversations")


def _prompt_completion(record: Mapping[str, Any], where: str) -> list[dict[str, str]]:
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, list) or isinstance(completion, list):  # TRL's conversational prompt/completion
        if not isinstance(prompt, list) or not isinstance(completion, list):
            raise DataError(f"{where}: 'prompt' and 'completion' must both be strings or both lists of messages")
        return _check_chat(prompt + completion, where, "prompt+completion")
    return [{"role": "user", "content": _need_str(record, "prompt", where)},
            {"role": "assistant", "content": _need_str(record, "completion", where, allow_empty=True)}]


def to_canonical(record: Any, data_format: str, columns: Mapping[str, str] | None, where: str) -> dict[str, Any]:
    """``{"text": str, "messages": None}`` or ``{"text": None, "messages": [...]}`` for one record.

    Raises DataError naming `where` (the record's index) and its keys when it fits no schema, or not
    the one `data_format` names.
    """
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}; use {_SHAPES}")
    record = _renamed(record, columns)
    fmt = detect_format(record, where) if data_format == "auto" else data_format
    if fmt == "text":
        return {"text": _need_str(record, "text", where), "messages": None}
    if fmt == "alpaca":
        instruction = _need_str(record, "instruction", where)
        if record.get("output") is None:
            raise DataError(f"{where}: an instruction record needs an 'output' (the answer to train on); "
                            f"keys {_present(record)}")
        output = _need_str(record, "output", where, allow_empty=True)
        extra = _need_str(record, "input", where, allow_empty=True) if record.get("input") is not None else ""
        system = [{"role": "system", "content": _need_str(record, "system", where)}] if record.get("system") else []
        user = instruction + (f"\n\n{extra}" if extra else "")
        return {"text": None, "messages": [*system, {"role": "user", "content": user},
                                           {"role": "assistant", "content": output}]}
    if fmt == "sharegpt":
        return {"text": None, "messages": _sharegpt(record.get("conversations"), where)}
    if fmt == "messages":
        return {"text": None, "messages": _check_chat(record.get("messages"), where)}
    if fmt == "prompt_completion":
        return {"text": None, "messages": _prompt_completion(record, where)}
    raise ConfigError(f"data_format={data_format!r} must be one of {', '.join(FORMATS)}", "data arguments")
