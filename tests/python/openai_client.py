"""Drives `quarry serve` with the official `openai` client (run by tests/serve.rs, which starts the server and
passes what `quarry run` replied). Any failed check raises, which fails the Rust test."""
import json
import os
import sys
import threading

import openai

base = os.environ["QUARRY_BASE_URL"]
want = os.environ["QUARRY_RUN_TEXT"]
prompt = os.environ["QUARRY_PROMPT"]
client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
model = client.models.list().data[0].id


def ask(text, max_tokens=12, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                          temperature=0, max_tokens=max_tokens, **kw)


# greedy = quarry run; stream and non-stream agree
whole = ask(prompt)
assert whole.choices[0].message.content == want, (whole.choices[0].message.content, want)
assert whole.usage.completion_tokens == 12 and whole.choices[0].finish_reason == "length"
pieces = [c for c in ask(prompt, stream=True, stream_options={"include_usage": True})]
text = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
assert text == want, (text, want)
assert pieces[0].choices[0].delta.role == "assistant"
assert pieces[-1].usage is not None and pieces[-1].usage.completion_tokens == 12

# concurrent requests each get their solo reply
prompts = ["Hello", "Wie spät ist es?", "def fib(n):", "1, 2, 3, 4,", prompt]
solo = {p: ask(p).choices[0].message.content for p in prompts}
got = {}
threads = [threading.Thread(target=lambda p=p: got.__setitem__(p, ask(p).choices[0].message.content))
           for p in prompts]
[t.start() for t in threads]
[t.join() for t in threads]
assert got == solo, (got, solo)

# forced tool calls parse with the client's own types
tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
          "parameters": {"type": "object", "properties": {"location": {"type": "string", "maxLength": 24}},
                         "required": ["location"], "additionalProperties": False}}}]
r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Weather in Boston?"}],
                                   tools=tools, tool_choice="required", temperature=0, max_tokens=96)
call = r.choices[0].message.tool_calls[0]
assert isinstance(call, openai.types.chat.ChatCompletionMessageToolCall)
assert call.function.name == "get_weather" and r.choices[0].finish_reason == "tool_calls"
assert isinstance(json.loads(call.function.arguments)["location"], str)
# streamed with the client's accumulation helper
with client.chat.completions.stream(model=model, messages=[{"role": "user", "content": "Weather in Boston?"}],
                                    tools=tools, tool_choice="required", temperature=0, max_tokens=96) as s:
    final = s.get_final_completion()
streamed = final.choices[0].message.tool_calls[0]
assert streamed.function.name == call.function.name
assert json.loads(streamed.function.arguments) == json.loads(call.function.arguments)
# the result goes back and the next turn is answered
follow = client.chat.completions.create(model=model, temperature=0, max_tokens=8, tools=tools, messages=[
    {"role": "user", "content": "Weather in Boston?"},
    {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
    {"role": "tool", "tool_call_id": call.id, "content": "{\"temperature\": 21}"}])
assert follow.choices[0].message is not None

# JSON-schema replies validate (the client's parse helper with a typed schema)
schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}
r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Invent a person."}],
                                   temperature=0, max_tokens=96,
                                   response_format={"type": "json_schema",
                                                    "json_schema": {"name": "person", "schema": schema}})
person = json.loads(r.choices[0].message.content)
assert set(person) == {"name", "age"} and isinstance(person["age"], int) and 0 <= person["age"] <= 150

# bad requests: the client's BadRequestError, and the server stays up
for bad in [dict(n=2), dict(max_tokens=-1), dict(response_format={"type": "json_schema",
                                                                  "json_schema": {"name": "x", "schema": {"type": "bogus"}}}),
            dict(tools=tools, tool_choice={"type": "function", "function": {"name": "nope"}})]:
    try:
        ask("hi", **bad)
    except openai.BadRequestError as e:
        assert isinstance(e.body, dict) and e.body.get("message"), e.body
    else:
        raise AssertionError("accepted: %r" % bad)
assert ask("Hello").choices[0].message.content == solo["Hello"]
print("openai client: all checks passed")
