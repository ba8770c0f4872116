"""Structured output and tool calls (issue 28, parts 1-2): the real `openai` client against
`edgellm serve` on a tiny random model. Constrained decoding makes even random weights write
schema-valid JSON; tool calls round-trip through a Hermes-style chat template; each tool-call
format (one per family) parses back, streamed or whole, and its forcing grammar accepts it;
bad schemas, tools and grammars are OpenAI-shaped 400s naming the field, and the server keeps
serving; `edgellm run --json-schema`.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from edgellm.cli import app

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
llguidance = pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from test_serve import Server  # noqa: E402

# A Hermes-style template (Qwen2.5's tool section, shortened to the tool names: the tiny tokenizer spells
# JSON in many tokens): tools in the system turn,
# calls as <tool_call>{json}</tool_call>, tool results as <tool_response>.
HERMES = (
    "{%- if tools %}<|system|><tools>{% for t in tools %} {{ t.function.name }}{% endfor %}</tools>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|assistant|>{% for c in m.tool_calls %}<tool_call>\n"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}\n</tool_call>'
    "{% endfor %}\n"
    "{%- elif m.role == 'tool' %}<|tool|><tool_response>\n{{ m.content }}\n</tool_response>\n"
    "{%- else %}<|{{ m.role }}|>{{ m.content }}\n{% endif %}{% endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>{% endif %}"
)

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 8},
                    "address": {
                        "type": "object",
                        "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["zip"],
                        "additionalProperties": False,
                    },
                },
                "required": ["name", "address"],
                "additionalProperties": False,
            }
        },
        "required": ["user"],
        "additionalProperties": False,
    },
    "enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
        "required": ["color", "ok"],
        "additionalProperties": False,
    },
    "array": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 3}
        },
        "required": ["tags"],
        "additionalProperties": False,
    },
    "bounds": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "score": {"type": "number", "minimum": -1.5, "maximum": 2.5},
        },
        "required": ["age", "score"],
        "additionalProperties": False,
    },
}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 5}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def exports(tiny_dirs, tmp_path_factory):
    """The tiny llama exported (fp32: fast to build), and a copy whose chat template takes tools."""
    root = tmp_path_factory.mktemp("grammar")
    plain = root / "tiny"
    r = CliRunner().invoke(app, ["export", str(tiny_dirs["llama"]), "-o", str(plain), "--no-check"])
    assert r.exit_code == 0, r.output
    tools = root / "tiny-tools"
    shutil.copytree(plain, tools)
    cfg = json.loads((tools / "tokenizer_config.json").read_text())
    cfg["chat_template"] = HERMES
    (tools / "tokenizer_config.json").write_text(json.dumps(cfg))
    return plain, tools


@pytest.fixture(scope="module")
def server(exports):
    s = Server(exports[0])
    s.model_id = exports[0].name
    yield s
    s.close()


@pytest.fixture(scope="module")
def tool_server(exports):
    s = Server(exports[1])
    s.model_id = exports[1].name
    yield s
    s.close()


def _fmt(name, schema):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


# ----------------------------------------------------------------------------- structured output
def test_json_schema_outputs_validate(server):
    """Random weights, sampled at temperature 1: every answer parses and validates."""
    client, model = server.client(), server.model_id
    msgs = [{"role": "user", "content": "Give me JSON."}]
    for i, (name, schema) in enumerate(SCHEMAS.items()):
        for seed in (1, 2):
            kw = dict(
                model=model, max_tokens=200, temperature=1.0, seed=seed + 10 * i, response_format=_fmt(name, schema)
            )
            r = client.chat.completions.create(messages=msgs, **kw)
            assert r.choices[0].finish_reason == "stop", (name, r.choices[0].message.content)
            jsonschema.validate(json.loads(r.choices[0].message.content), schema)
            chunks = list(client.chat.completions.create(messages=msgs, stream=True, **kw))
            streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert streamed == r.choices[0].message.content  # streaming keeps working, same text
        fmt = kw.pop("response_format")  # completions take response_format too (the client sends it as extra_body)
        r = client.completions.create(prompt="JSON:", extra_body={"response_format": fmt}, **kw)
        jsonschema.validate(json.loads(r.choices[0].text), schema)

    r = client.chat.completions.create(
        model=model, messages=msgs, max_tokens=200, temperature=1.0, seed=5, response_format={"type": "json_object"}
    )
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)


def test_regex_and_grammar_extensions(server):
    client, model = server.client(), server.model_id
    for seed in (1, 2, 3):
        r = client.completions.create(
            model=model,
            prompt="Date:",
            max_tokens=40,
            temperature=1.0,
            seed=seed,
            extra_body={"guided_regex": r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"},
        )
        assert re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]", r.choices[0].text), r.choices[0].text
    gbnf = 'root ::= "yes" | "no" | "maybe"'  # llama.cpp's GBNF, under its field name `grammar`
    for seed in (1, 2, 3):
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "ok?"}],
            max_tokens=10,
            temperature=1.0,
            seed=seed,
            extra_body={"grammar": gbnf},
        )
        assert r.choices[0].message.content in ("yes", "no", "maybe")
        assert r.choices[0].finish_reason == "stop"
    lark = 'start: "n=" NUM\nNUM: /[1-9][0-9]?/'
    r = client.completions.create(
        model=model, prompt="x", max_tokens=10, temperature=1.0, seed=4, extra_body={"guided_grammar": lark}
    )
    assert re.fullmatch(r"n=[1-9][0-9]?", r.choices[0].text)


# ----------------------------------------------------------------------------- tool calls
def test_tool_choice_required_always_calls(tool_server):
    client, model = tool_server.client(), tool_server.model_id
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    params = WEATHER["function"]["parameters"]
    for seed in range(4):
        r = client.chat.completions.create(
            model=model,
            messages=msgs,
            tools=[WEATHER, TIME],
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=120,
            temperature=1.0,
            seed=seed,
        )
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1, ch
        call = ch.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in ("get_weather", "get_time")
        args = json.loads(call.function.arguments)
        schema = params if call.function.name == "get_weather" else TIME["function"]["parameters"]
        jsonschema.validate(args, schema)
    # a named function: always that one
    for seed in range(2):
        r = client.chat.completions.create(
            model=model,
            messages=msgs,
            tools=[WEATHER, TIME],
            max_tokens=120,
            temperature=1.0,
            seed=seed,
            tool_choice={"type": "function", "function": {"name": "get_time"}},
        )
        calls = r.choices[0].message.tool_calls
        assert calls and all(c.function.name == "get_time" for c in calls)
        jsonschema.validate(json.loads(calls[0].function.arguments), TIME["function"]["parameters"])


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_round_trip(tool_server, stream):
    """call -> tool result -> final answer, with the openai client's own message objects."""
    client, model = tool_server.client(), tool_server.model_id
    msgs = [{"role": "user", "content": "Weather in Oslo?"}]
    kw = dict(model=model, tools=[WEATHER], parallel_tool_calls=False, max_tokens=120, temperature=1.0, seed=3)
    if not stream:
        r = client.chat.completions.create(messages=msgs, tool_choice="required", **kw)
        call = r.choices[0].message.tool_calls[0]
        assistant = r.choices[0].message.model_dump(exclude_none=True)
    else:
        chunks = list(client.chat.completions.create(messages=msgs, tool_choice="required", stream=True, **kw))
        deltas = [
            tc for c in chunks if c.choices and c.choices[0].delta.tool_calls for tc in c.choices[0].delta.tool_calls
        ]
        # OpenAI's shape: the first delta of a call has id, type and name; the arguments follow
        assert deltas[0].index == 0 and deltas[0].id and deltas[0].type == "function" and deltas[0].function.name
        name = deltas[0].function.name
        arguments = "".join(d.function.arguments or "" for d in deltas if d.index == 0)
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
            "tool_calls"
        ]
        call = type("Call", (), {"id": deltas[0].id, "function": type("F", (), {"name": name, "arguments": arguments})})
        assistant = {
            "role": "assistant",
            "tool_calls": [{"id": call.id, "type": "function", "function": {"name": name, "arguments": arguments}}],
        }
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    msgs += [assistant, {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp": 4})}]

    # the conversation continues: the template renders the call and its result, the model answers
    prompt = tool_server.gen.tokenizer.apply_chat_template(
        [
            msgs[0],
            {"role": "assistant", "tool_calls": [{"function": {"name": "get_weather", "arguments": {}}}]},
            {"role": "tool", "content": "RESULT"},
        ],
        tools=[WEATHER],
    )
    assert "<tool_response>\nRESULT\n</tool_response>" in prompt
    final = dict(kw, tool_choice="auto", max_tokens=12)  # auto: the answer goes through the tool-call parser
    if stream:
        chunks = list(client.chat.completions.create(messages=msgs, stream=True, **final))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        r = client.chat.completions.create(messages=msgs, **final)
        text = r.choices[0].message.content
        assert r.choices[0].message.tool_calls is None and r.usage.prompt_tokens > 40
    assert isinstance(text, str) and text


def test_streamed_tool_calls_match_the_whole_answer(tool_server):
    """Streaming: each call's head (index, id, type, name, arguments "") comes first, then its
    arguments in several deltas as the model writes them; the openai client's accumulation of the
    deltas gives the same calls as the same request answered whole; no markup becomes content."""
    client, model = tool_server.client(), tool_server.model_id
    msgs = [{"role": "user", "content": "Weather in Lima and the time?"}]
    kw = dict(model=model, messages=msgs, tools=[WEATHER, TIME], tool_choice="required", max_tokens=160)
    several = 0
    for seed in range(3):
        answer = client.chat.completions.create(temperature=1.0, seed=seed, **kw).choices[0]
        whole = answer.message
        chunks = list(client.chat.completions.create(temperature=1.0, seed=seed, stream=True, **kw))
        calls, n_args = {}, {}
        for c in chunks:
            d = c.choices[0].delta if c.choices else None
            assert not (d and d.content and "tool_call" in d.content), d.content
            for tc in (d.tool_calls or []) if d else []:
                if tc.index not in calls:  # a head: id, type and name, empty arguments
                    assert tc.id and tc.type == "function" and tc.function.name and tc.function.arguments == ""
                    assert tc.index == len(calls)  # parallel calls: index 0, 1, ...
                    calls[tc.index], n_args[tc.index] = [tc.function.name, ""], 0
                else:  # a piece of the arguments only
                    assert tc.id is None and tc.function.name is None and tc.function.arguments
                    calls[tc.index][1] += tc.function.arguments
                    n_args[tc.index] += 1
        assert [tuple(v) for v in calls.values()] == [(t.function.name, t.function.arguments) for t in whole.tool_calls]
        for i, (name, args) in calls.items():
            if answer.finish_reason == "length" and i == len(calls) - 1:
                continue  # the last call may be cut off
            jsonschema.validate(
                json.loads(args), (WEATHER if name == "get_weather" else TIME)["function"]["parameters"]
            )
            several += name == "get_weather" and n_args[i] > 1
        assert chunks[-1].choices[0].finish_reason == answer.finish_reason  # tool_calls, or length: cut off
        assert answer.finish_reason in ("tool_calls", "length")
    assert several  # a call with two arguments came in more than one delta


# ----------------------------------------------------------------------------- every family's format
SAMPLES = {
    "hermes": 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}, '
    '{"name": "get_time", "arguments": {"zone": "CET"}}]',
    "phi4": '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}, '
    '{"name": "get_time", "arguments": {"zone": "CET"}}]<|/tool_call|>',
    "granite": '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}, '
    '{"name": "get_time", "arguments": {"zone": "CET"}}]',
    "llama3_json": '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "C"}}; '
    '{"name": "get_time", "parameters": {"zone": "CET"}}',
}


@pytest.mark.parametrize("name", list(SAMPLES))
def test_each_family_format_parses_whole_and_streamed(name, tokenizer, tmp_path):
    from edgellm.runtime import tools as T
    from edgellm.runtime.constrain import compile_grammar
    from edgellm.runtime.generate import Tokenizer

    fmt = next(f for f in T.FORMATS if f.name == name)
    text = SAMPLES[name]
    want = [("get_weather", {"city": "Oslo", "unit": "C"}), ("get_time", {"zone": "CET"})]

    def calls(events):  # the calls the events put together (as the openai client accumulates deltas)
        out = []
        for k, v in events:
            if k == "call":
                assert v["index"] == len(out) and v["function"]["arguments"] == ""  # 0, 1, ...: a head first
                out.append([v["function"]["name"], ""])
            elif k == "arguments":
                out[v[0]][1] += v[1]
        return [(n, json.loads(a)) for n, a in out]

    content, whole = T.ToolParser.collect(fmt, text)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole] == want
    assert content == ("Sure." if name == "hermes" else "")
    assert all(len(c["id"]) == 9 and c["id"].isalnum() for c in whole) == (fmt.id_chars == 9)
    p = T.ToolParser(fmt)
    streamed = [e for ch in text for e in p.feed(ch)] + p.finish()  # one character at a time
    assert calls(streamed) == want and "".join(v for k, v in streamed if k == "content") == content
    # the arguments stream as they come: a call with two arguments in many pieces, each announced first
    pieces = [v[1] for k, v in streamed if k == "arguments" and v[0] == 0]
    assert len(pieces) > 2 and "".join(pieces) == '{"city": "Oslo", "unit": "C"}'
    # cut where a piece ends: the same calls; cut inside the first call's arguments: the head and a prefix
    p = T.ToolParser(fmt)
    cut = text.index('"unit"')
    first = p.feed(text[:cut])
    heads = [v for k, v in first if k == "call"]
    assert [h["function"]["name"] for h in heads] == ["get_weather"]
    assert "".join(v[1] for k, v in first if k == "arguments") == text[text.index('{"city"') : cut]
    assert calls(first + p.feed(text[cut:]) + p.finish()) == want
    # plain text is content, never a call
    p = T.ToolParser(fmt)
    assert p.feed("The weather is fine.") + p.finish() == [("content", "The weather is fine.")]
    # markup that holds no call is content as written; nothing of a call's markup is content
    assert T.ToolParser.collect(fmt, fmt.open + "not a call") == (fmt.open + "not a call", [])
    for cut in range(len(text)):
        p = T.ToolParser(fmt)
        ev = p.feed(text[:cut]) + p.feed(text[cut:]) + p.finish()
        assert "".join(v for k, v in ev if k == "content") == content, cut

    # the forcing grammar (required, parallel) accepts the sample's calls
    tokenizer.save_pretrained(str(tmp_path))
    tok = Tokenizer(tmp_path)
    lark = T.call_grammar([WEATHER, TIME], fmt, None, True, {})
    g = compile_grammar(tok, 512, {0}, "grammar", lark)
    c = g.start()
    body = text[len("Sure.") :] if name == "hermes" else text
    assert c.matcher.consume_tokens(tok.encode(body, special=False)), c.matcher.get_error()
    assert c.accepting


def test_tool_parser_edge_cases():
    """Arguments before the name (sent once the name is known), arguments as a JSON string (sent
    decoded), a call cut off by max_tokens (the arguments so far), junk after a call inside its
    block (dropped, never content), text after the block (content)."""
    from edgellm.runtime import tools as T

    f = next(f for f in T.FORMATS if f.name == "hermes")

    def parse(text):
        content, calls = T.ToolParser.collect(f, text)
        return content, [(c["function"]["name"], c["function"]["arguments"]) for c in calls]

    assert parse('Hi <tool_call>\n{"arguments": {"a": 1}, "name": "x"}\n</tool_call>') == ("Hi ", [("x", '{"a": 1}')])
    assert parse('<tool_call>{"name": "x", "arguments": "{\\"a\\": 1}"}</tool_call>') == ("", [("x", '{"a": 1}')])
    assert parse('<tool_call>\n{"name": "x", "arguments": {"a": [1, 2') == ("", [("x", '{"a": [1, 2')])
    assert parse('<tool_call>{"name": "x"}</tool_call> bye') == (" bye", [("x", "{}")])
    assert parse('<tool_call>{"name": "x", "arguments": {}} junk </tool_call> bye') == (" bye", [("x", "{}")])
    assert parse('<tool_call>{"nom": "x"}</tool_call>') == ('<tool_call>{"nom": "x"}</tool_call>', [])


def test_template_detection():
    from edgellm.runtime import tools as T

    assert T.detect(HERMES).name == "hermes"
    assert T.detect("{% for t in tools %}[AVAILABLE_TOOLS]{% endfor %}[TOOL_CALLS]").name == "mistral"
    assert T.detect("{{ tools }} Given the following functions <|python_tag|>").name == "llama3_json"
    with pytest.raises(T.ToolsError, match="does not support tools"):
        T.detect("{% for m in messages %}{{ m.content }}{% endfor %}")


# ----------------------------------------------------------------------------- bad input
def test_bad_input_is_a_400_naming_the_field(server, tool_server):
    model = server.model_id
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}

    def err(s, body, param, path="/v1/chat/completions"):
        status, _, out = s.call("POST", path, body)
        assert status == 400 and out["error"]["param"] == param, out
        assert out["error"]["type"] == "invalid_request_error"
        return out["error"]["message"]

    # schemas the library cannot compile: the library's reason, the field
    assert "foo" in err(
        server, {**chat, "response_format": _fmt("x", {"type": "foo"})}, "response_format.json_schema.schema"
    )
    assert "not" in err(
        server,
        {**chat, "response_format": _fmt("x", {"not": {"type": "string"}})},
        "response_format.json_schema.schema",
    )
    err(
        server,
        {**chat, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        "response_format.json_schema.schema",
    )
    err(server, {**chat, "response_format": {"type": "yaml"}}, "response_format.type")
    err(server, {**chat, "response_format": "json"}, "response_format")  # not an object (found by serve_soak)
    err(server, {**chat, "guided_regex": "(("}, "guided_regex")
    err(server, {**chat, "guided_grammar": "start: ]"}, "guided_grammar")
    err(server, {**chat, "guided_regex": "a", "grammar": 'root ::= "a"'}, "grammar")
    # a grammar that allows no token: at the start (found before any model step) and mid-way
    assert "at the start" in err(server, {**chat, "guided_grammar": "start: A\nA: /a+/ & /b+/"}, "guided_grammar")
    msg = err(server, {**chat, "guided_grammar": 'start: "ab" C\nC: /x+/ & /y+/'}, "guided_grammar")
    assert "allows no token after" in msg and "'ab'" in msg, msg
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)  # streaming: the 400 as an event
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps({**chat, "stream": True, "guided_grammar": 'start: "ab" C\nC: /x+/ & /y+/'}),
    )
    events = [json.loads(x[6:]) for x in conn.getresponse().read().decode().split("\n\n") if x.startswith("data: {")]
    conn.close()
    assert (
        events[-1]["error"]["param"] == "guided_grammar" and "allows no token after" in events[-1]["error"]["message"]
    )

    # tools: malformed definitions, a tool_choice naming no tool, a template without tools
    tchat = {**chat, "model": tool_server.model_id}
    err(
        tool_server,
        {**tchat, "tools": [{"type": "function", "function": {"description": "no name"}}]},
        "tools[0].function.name",
    )
    err(
        tool_server,
        {**tchat, "tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
        "tools[0].function.parameters",
    )
    err(tool_server, {**tchat, "tools": [{"type": "fn"}]}, "tools[0]")
    bad_params = {"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}
    err(tool_server, {**tchat, "tools": [bad_params], "tool_choice": "required"}, "tools")
    err(tool_server, {**tchat, "tools": [bad_params]}, "tools")  # under auto too (found by serve_soak)
    assert "get_time" in err(
        tool_server,
        {**tchat, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
        "tool_choice",
    )
    err(tool_server, {**tchat, "tool_choice": "required"}, "tool_choice")
    assert "does not support tools" in err(server, {**chat, "tools": [WEATHER]}, "tools")

    # the servers keep serving
    for s in (server, tool_server):
        r = s.client().chat.completions.create(model=s.model_id, messages=chat["messages"], max_tokens=4)
        assert r.choices[0].message.content is not None


# ----------------------------------------------------------------------------- edgellm run
def test_run_json_schema(exports, tmp_path):
    schema = SCHEMAS["enum"]
    f = tmp_path / "schema.json"
    f.write_text(json.dumps(schema))
    r = CliRunner().invoke(
        app, ["run", str(exports[0]), "-p", "JSON:", "--json-schema", str(f), "-t", "1", "--seed", "3", "-n", "100"]
    )
    assert r.exit_code == 0, r.output
    jsonschema.validate(json.loads(r.stdout), schema)
    f.write_text('{"type": "foo"}')
    r = CliRunner().invoke(app, ["run", str(exports[0]), "-p", "x", "--json-schema", str(f)])
    assert r.exit_code == 2 and "--json-schema" in r.output and "foo" in r.output
    f.write_text("{nope")
    r = CliRunner().invoke(app, ["run", str(exports[0]), "-p", "x", "--json-schema", str(f)])
    assert r.exit_code == 2 and "not valid JSON" in r.output


def test_python_api(exports):
    from edgellm.runtime import Sampling, load

    gen = load(exports[0], threads=2, n_ctx=512)
    schema = SCHEMAS["bounds"]
    for seed in (1, 2):
        text = "".join(
            gen.stream("JSON:", Sampling(temperature=1.0, seed=seed, grammar=gen.grammar("json_schema", schema)))
        )
        assert gen.stats.stop_reason == "eos"
        jsonschema.validate(json.loads(text), schema)
    free = "".join(gen.stream("JSON:", Sampling(temperature=1.0, seed=1, max_new_tokens=20)))
    with pytest.raises(json.JSONDecodeError):  # the same sampling without the grammar is not JSON
        json.loads(free)


def test_special_token_markers(tokenizer, tmp_path):
    """Mistral's [TOOL_CALLS] is a special token: decode keeps its text when asked (so the parser
    sees it), and the forcing grammar writes it as that token, not as the letters."""
    from tokenizers import Tokenizer as HFTokenizer

    from edgellm.runtime import tools as T
    from edgellm.runtime.constrain import compile_grammar
    from edgellm.runtime.generate import Tokenizer
    from edgellm.runtime.guided import special_ids

    tokenizer.save_pretrained(str(tmp_path))
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    hf.add_special_tokens(["[TOOL_CALLS]"])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer(tmp_path)
    fmt = next(f for f in T.FORMATS if f.name == "mistral")
    special = special_ids(tok, T.markers_of(fmt))
    mark = special["[TOOL_CALLS]"]
    body = tok.encode('[{"name": "get_time", "arguments": {"zone": "UTC"}}]', special=False)
    assert "[TOOL_CALLS]" not in tok.decode([mark] + body)  # special tokens are dropped by default
    text = tok.decode([mark] + body, keep=(mark,))
    p = T.ToolParser(fmt)
    calls = [v for k, v in p.feed(text) + p.finish() if k == "call"]
    assert [c["function"]["name"] for c in calls] == ["get_time"]

    g = compile_grammar(tok, 513, {0}, "grammar", T.call_grammar([WEATHER, TIME], fmt, "get_time", False, special))
    c = g.start()
    allowed = c.allowed()
    assert allowed[mark] and allowed.sum() == 1  # the call starts with the special token, and only with it
    assert c.matcher.consume_tokens([mark] + body) and c.accepting


def test_parallel_slots_keep_the_grammar(exports):
    """--parallel: each slot masks its own row with its own grammar state (slot_engine.pick)."""
    from concurrent.futures import ThreadPoolExecutor

    s = Server(exports[1], parallel=3)
    try:
        client = s.client()
        msgs = [{"role": "user", "content": "JSON please"}]

        def one(seed):
            if seed % 2:
                r = client.chat.completions.create(
                    model=exports[1].name,
                    messages=msgs,
                    tools=[WEATHER],
                    tool_choice="required",
                    parallel_tool_calls=False,
                    max_tokens=120,
                    temperature=1.0,
                    seed=seed,
                )
                args = json.loads(r.choices[0].message.tool_calls[0].function.arguments)
                return jsonschema.validate(args, WEATHER["function"]["parameters"])
            schema = list(SCHEMAS.values())[seed % 4]
            r = client.chat.completions.create(
                model=exports[1].name,
                messages=msgs,
                max_tokens=200,
                temperature=1.0,
                seed=seed,
                response_format=_fmt("x", schema),
            )
            assert r.choices[0].finish_reason == "stop"
            jsonschema.validate(json.loads(r.choices[0].message.content), schema)

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one, range(6)))
        status, _, body = s.call(
            "POST",
            "/v1/chat/completions",
            {"model": exports[1].name, "messages": msgs, "guided_grammar": 'start: "ab" C\nC: /x+/ & /y+/'},
        )
        assert status == 400 and body["error"]["param"] == "guided_grammar"
    finally:
        s.close()
