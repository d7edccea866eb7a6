"""Forced tool calls against a live `pagedllm serve` (default model), through the openai
client: N requests with `tool_choice="required"` over two tools at temperature 0.8, each
seeded, non-streaming and streaming; how many parse, name a declared function and carry
schema-valid arguments, and whether both ways give the same calls.

Usage: python benchmarks/bench_tool_calls.py [--requests 100] [--port 8123] [-- SERVE_FLAGS...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jsonschema
import openai

ROOT = Path(__file__).resolve().parents[1]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather of a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 30},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the web",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "maxLength": 60},
                    "limit": {"type": "integer", "minimum": 1, "maximum": 10},
                },
                "required": ["query"],
                "additionalProperties": False,
            },
        },
    },
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTIONS = [
    "What is the weather in Paris?",
    "Find me recipes for pancakes.",
    "Is it raining in Tokyo?",
    "Who won the last world cup?",
]


def valid(calls: list[tuple[str, str]]) -> bool:
    if not calls:
        return False
    for name, arguments in calls:
        if name not in SCHEMAS:
            return False
        try:
            jsonschema.validate(json.loads(arguments), SCHEMAS[name])
        except (ValueError, jsonschema.ValidationError):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("serve_flags", nargs="*", help="flags for pagedllm serve, after --")
    args = parser.parse_args()
    server = subprocess.Popen(
        [
            sys.executable,
            *("-m", "pagedllm.entrypoints.cli", "serve", "--port", str(args.port)),
            *args.serve_flags,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        model = client.models.list().data[0].id
        ok = agree = 0
        start = time.perf_counter()
        for i in range(args.requests):
            kwargs = dict(
                model=model,
                messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                tools=TOOLS,
                tool_choice="required",
                temperature=0.8,
                seed=i,
                max_tokens=200,
            )
            reply = client.chat.completions.create(**kwargs)
            calls = [
                (c.function.name, c.function.arguments)
                for c in reply.choices[0].message.tool_calls or []
            ]
            streamed: dict[int, list[str]] = {}
            for chunk in client.chat.completions.create(stream=True, **kwargs):
                for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                    entry = streamed.setdefault(delta.index, ["", ""])
                    entry[0] += delta.function.name or ""
                    entry[1] += delta.function.arguments or ""
            ok += valid(calls)
            agree += calls == [tuple(v) for v in streamed.values()]
        elapsed = time.perf_counter() - start
        print(
            f"tool_choice=required: {ok}/{args.requests} parse, name a declared function and "
            f"validate; streaming agrees with non-streaming in {agree}/{args.requests} "
            f"({elapsed:.1f} s for both)"
        )
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
