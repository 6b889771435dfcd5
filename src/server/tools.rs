//! Granite tool calls over the OpenAI API: the request's `tools` and `tool_choice`, the conversation's tool
//! turns in the roles Granite's templates know, the grammar that forces a call, and the reply's
//! `<|tool_call|>[{"name": ..., "arguments": {...}}]` parsed into OpenAI `tool_calls`.
//!
//! Granite writes a call as the special token `<|tool_call|>` and then a JSON list of `{"name", "arguments"}`
//! objects (IBM's model cards, the 3.0 and 3.1 templates). The 3.0 template gives an earlier call back to the
//! model through its own `assistant_tool_call` role and a result through `tool_response`; the 3.1 template
//! prints any role as named, so a call goes back as an assistant turn that starts with `<|tool_call|>` and a
//! result as a `tool_response` turn, which is the role IBM's examples use for both.

use serde_json::{Map, Value, json};

use super::ApiError;
use crate::text::chat_template::Message;

/// Granite's marker before a list of calls.
pub const TOOL_CALL_MARKER: &str = "<|tool_call|>";

/// One function the model may call.
#[derive(Clone, Debug, PartialEq)]
pub struct Tool {
    pub name: String,
    /// A JSON schema of the arguments object.
    pub parameters: Value,
    /// The tool as the request gave it, which is what the template prints.
    pub definition: Value,
}

/// What the request lets or makes the model do with its tools.
#[derive(Clone, Debug, PartialEq)]
pub enum ToolChoice {
    /// No call: the tools are not shown to the model.
    None,
    /// The model decides; a call it writes is parsed.
    Auto,
    /// A call of one of the tools, forced by the grammar.
    Required,
    /// A call of this tool, forced by the grammar.
    Function(String),
}

/// The request's `tools` (OpenAI's `[{"type": "function", "function": {"name", "description", "parameters"}}]`)
/// and `tool_choice`; an unknown named function, a malformed tool or choice is a 400.
pub fn parse_tools(body: &Map<String, Value>) -> Result<(Vec<Tool>, ToolChoice), ApiError> {
    if body.get("functions").is_some_and(|v| !v.is_null()) {
        return Err(ApiError::bad_request(
            "\"functions\" (OpenAI's deprecated form) is not supported: send them as \"tools\": [{\"type\": \"function\", \"function\": {...}}]",
        ));
    }
    let tools = match body.get("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, t)| {
                parse_tool(t).map_err(|e| ApiError::bad_request(format!("tools[{i}]: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err(ApiError::bad_request("\"tools\" must be a list")),
    };
    for (i, t) in tools.iter().enumerate() {
        if tools[..i].iter().any(|u| u.name == t.name) {
            return Err(ApiError::bad_request(format!(
                "tools[{i}]: a second tool named \"{}\"",
                t.name
            )));
        }
    }
    let choice = match body.get("tool_choice") {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(ApiError::bad_request(format!(
                    "\"tool_choice\" \"{other}\" is not one of none, auto, required, or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"
                )));
            }
        },
        Some(Value::Object(o)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "\"tool_choice\" as an object must be {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    )
                })?;
            if !tools.iter().any(|t| t.name == name) {
                return Err(ApiError::bad_request(format!(
                    "\"tool_choice\" names the function \"{name}\", which is not among the request's tools"
                )));
            }
            ToolChoice::Function(name.to_string())
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                "\"tool_choice\" must be a string or an object",
            ));
        }
    };
    if tools.is_empty() && matches!(choice, ToolChoice::Required | ToolChoice::Function(_)) {
        return Err(ApiError::bad_request(
            "\"tool_choice\" asks for a tool call but the request has no \"tools\"",
        ));
    }
    Ok((tools, choice))
}

fn parse_tool(t: &Value) -> Result<Tool, String> {
    let kind = t.get("type").and_then(Value::as_str).unwrap_or("function");
    if kind != "function" {
        return Err(format!("type \"{kind}\" is not supported (only function)"));
    }
    let f = t
        .get("function")
        .and_then(Value::as_object)
        .ok_or("must be {\"type\": \"function\", \"function\": {\"name\", \"parameters\"}}")?;
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty() && n.len() <= 64)
        .ok_or("\"function.name\" must be a non-empty string of at most 64 bytes")?;
    let parameters = match f.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(_) => return Err("\"function.parameters\" must be a JSON schema object".into()),
    };
    Ok(Tool {
        name: name.to_string(),
        parameters,
        definition: t.clone(),
    })
}

/// A Lark grammar (llguidance's dialect) for `<|tool_call|>` and a list of calls of `tools` (just `only` when
/// given): one call, or with `parallel` one or more. Each call is `{"name": NAME, "arguments": ARGS}` with ARGS
/// valid against that tool's schema, written compactly.
pub fn call_grammar(tools: &[Tool], only: Option<&str>, parallel: bool) -> String {
    let chosen: Vec<&Tool> = tools
        .iter()
        .filter(|t| only.is_none_or(|n| n == t.name))
        .collect();
    let mut g = String::from("start: <|tool_call|> \"[\" call ");
    if parallel {
        g.push_str("(\",\" call)* ");
    }
    g.push_str("\"]\"\ncall: ");
    let alternatives: Vec<String> = (0..chosen.len()).map(|i| format!("tool_{i}")).collect();
    g.push_str(&alternatives.join(" | "));
    g.push('\n');
    for (i, t) in chosen.iter().enumerate() {
        let schema = json!({
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": t.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": false,
            "x-guidance": {"whitespace_flexible": false},
        });
        g.push_str(&format!("tool_{i}: %json {schema}\n"));
    }
    g
}

/// One parsed call.
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedCall {
    pub name: String,
    /// The arguments object as JSON text (OpenAI sends `arguments` as a string).
    pub arguments: String,
}

/// A reply read for tool calls: the text before the marker, and the calls after it. A reply without the
/// marker, or whose calls do not parse, is all content (with the marker, as the model wrote it).
#[derive(Clone, Debug, PartialEq)]
pub struct ToolReply {
    pub content: String,
    pub calls: Vec<ParsedCall>,
}

/// Reads a whole reply, the marker written as text (`<|tool_call|>`).
pub fn parse_reply(text: &str) -> ToolReply {
    let all_content = || ToolReply {
        content: text.to_string(),
        calls: Vec::new(),
    };
    let Some(at) = text.find(TOOL_CALL_MARKER) else {
        return all_content();
    };
    let after = &text[at + TOOL_CALL_MARKER.len()..];
    let mut values = serde_json::Deserializer::from_str(after).into_iter::<Value>();
    let value = match values.next() {
        Some(Ok(v)) => v,
        _ => return all_content(),
    };
    if !after[values.byte_offset()..].trim().is_empty() {
        return all_content();
    }
    let items = match value {
        Value::Array(items) if !items.is_empty() => items,
        // A single call written without its list.
        v @ Value::Object(_) => vec![v],
        _ => return all_content(),
    };
    match items.iter().map(parse_call).collect::<Option<Vec<_>>>() {
        Some(calls) => ToolReply {
            content: text[..at].trim_end().to_string(),
            calls,
        },
        None => all_content(),
    }
}

/// `{"name": ..., "arguments": {...}}` in either key order; `arguments` may also come as a JSON string of an
/// object (as OpenAI writes it) or under `parameters`.
pub fn parse_call(v: &Value) -> Option<ParsedCall> {
    let o = v.as_object()?;
    let name = o.get("name")?.as_str().filter(|n| !n.is_empty())?;
    let arguments = match o.get("arguments").or_else(|| o.get("parameters")) {
        Some(a @ Value::Object(_)) => a.to_string(),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(a @ Value::Object(_)) => a.to_string(),
            _ => return None,
        },
        None | Some(Value::Null) => "{}".to_string(),
        Some(_) => return None,
    };
    Some(ParsedCall {
        name: name.to_string(),
        arguments,
    })
}

/// The items of a JSON list that are complete so far, as text: for `[{"a": 1}, {"b"` the first object. Lets a
/// stream send each call as soon as it is whole. Text that is not a list gives nothing.
pub fn complete_items(text: &str) -> Vec<&str> {
    let t = text.trim_start();
    let Some(body) = t.strip_prefix('[') else {
        return Vec::new();
    };
    let mut items = Vec::new();
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    let mut start = None;
    for (i, c) in body.char_indices() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                start.get_or_insert(i);
            }
            '{' | '[' => {
                start.get_or_insert(i);
                depth += 1;
            }
            '}' | ']' if depth > 0 => {
                depth -= 1;
                if depth == 0
                    && let Some(s) = start.take()
                {
                    items.push(&body[s..=i]);
                }
            }
            ']' => break,
            _ if depth == 0 && !c.is_whitespace() && c != ',' => {
                // A bare value (a number, true) as an item: not a call; stop reading.
                break;
            }
            _ => {}
        }
    }
    items
}

/// The request's messages in the roles the template knows: `tool` results as `tool_response`, an assistant's
/// `tool_calls` as Granite's call text (through `assistant_tool_call` where the template names that role, else
/// an assistant turn that starts with the marker).
pub fn granite_messages(messages: Vec<Message>, template_source: &str) -> Vec<Message> {
    let call_role = template_source.contains("assistant_tool_call");
    messages
        .into_iter()
        .map(|m| {
            let role = m.role().unwrap_or_default().to_string();
            if role == "tool" {
                return Message::new("tool_response", m.content().unwrap_or_default());
            }
            let calls = match m.0.get("tool_calls") {
                Some(Value::Array(calls)) if role == "assistant" && !calls.is_empty() => calls,
                _ => return m,
            };
            let list: Vec<Value> = calls
                .iter()
                .map(|c| {
                    let f = c.get("function").unwrap_or(c);
                    let arguments = match f.get("arguments") {
                        Some(Value::String(s)) => serde_json::from_str(s).unwrap_or(json!(s)),
                        Some(v) => v.clone(),
                        None => json!({}),
                    };
                    json!({"name": f.get("name").cloned().unwrap_or(Value::Null), "arguments": arguments})
                })
                .collect();
            let list = Value::Array(list).to_string();
            let before = m.content().unwrap_or_default();
            if call_role && before.is_empty() {
                Message::new("assistant_tool_call", &list)
            } else {
                Message::new("assistant", &format!("{before}{TOOL_CALL_MARKER}{list}"))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, arguments: Value) -> ParsedCall {
        ParsedCall {
            name: name.into(),
            arguments: arguments.to_string(),
        }
    }

    #[test]
    fn granite_calls_parse_in_either_key_order() {
        // Granite 3.0 model card: name first.
        let r = parse_reply(
            r#"<|tool_call|>[{"name": "get_current_weather", "arguments": {"location": "Boston, MA"}}]"#,
        );
        assert_eq!(r.content, "");
        assert_eq!(
            r.calls,
            vec![call(
                "get_current_weather",
                json!({"location": "Boston, MA"})
            )]
        );
        // Arguments first, as 3.1 outputs have been seen to write it.
        let r =
            parse_reply(r#"<|tool_call|>[{"arguments": {"timezone": "UTC"}, "name": "get_time"}]"#);
        assert_eq!(r.calls, vec![call("get_time", json!({"timezone": "UTC"}))]);
    }

    #[test]
    fn several_calls_each_parse() {
        let r = parse_reply(
            "<|tool_call|>[{\"name\": \"a\", \"arguments\": {\"x\": 1}},\n {\"name\": \"b\", \"arguments\": {}}]",
        );
        assert_eq!(
            r.calls,
            vec![call("a", json!({"x": 1})), call("b", json!({}))]
        );
    }

    #[test]
    fn text_before_the_call_is_content() {
        let r = parse_reply(
            "Let me look that up.\n<|tool_call|>[{\"name\": \"search\", \"arguments\": {\"q\": \"granite\"}}]",
        );
        assert_eq!(r.content, "Let me look that up.");
        assert_eq!(r.calls, vec![call("search", json!({"q": "granite"}))]);
    }

    #[test]
    fn malformed_calls_stay_content() {
        for text in [
            "<|tool_call|>[{\"name\": \"a\", \"arguments\": {\"x\": 1}",
            "<|tool_call|>[{\"arguments\": {}}]",
            "<|tool_call|>[{\"name\": \"a\", \"arguments\": 3}]",
            "<|tool_call|>[]",
            "<|tool_call|>not json",
            "<|tool_call|>[{\"name\": \"a\", \"arguments\": {}}] and then some words",
            "plain text, no call",
        ] {
            let r = parse_reply(text);
            assert_eq!(r.content, text, "{text}");
            assert!(r.calls.is_empty(), "{text}");
        }
    }

    #[test]
    fn arguments_as_a_string_or_a_single_call() {
        let r = parse_reply(r#"<|tool_call|>{"name": "a", "arguments": "{\"k\": \"v\"}"}"#);
        assert_eq!(r.calls, vec![call("a", json!({"k": "v"}))]);
    }

    #[test]
    fn complete_items_of_a_growing_list() {
        assert!(complete_items("[{\"name\": \"a\", \"argu").is_empty());
        let whole = "[{\"name\": \"a}\", \"arguments\": {\"s\": \"]\\\"\"}}, {\"name\"";
        assert_eq!(
            complete_items(whole),
            vec!["{\"name\": \"a}\", \"arguments\": {\"s\": \"]\\\"\"}}"]
        );
        assert_eq!(complete_items("[{}, {}]").len(), 2);
        assert!(complete_items("{\"name\": 1}").is_empty());
    }

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn tool_choice_forms_and_refusals() {
        let tools = json!([{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]);
        let (t, c) = parse_tools(&body(json!({"tools": tools}))).unwrap();
        assert_eq!((t.len(), c), (1, ToolChoice::Auto));
        let (_, c) =
            parse_tools(&body(json!({"tools": tools, "tool_choice": "required"}))).unwrap();
        assert_eq!(c, ToolChoice::Required);
        let named = json!({"type": "function", "function": {"name": "get_time"}});
        let (_, c) = parse_tools(&body(json!({"tools": tools, "tool_choice": named}))).unwrap();
        assert_eq!(c, ToolChoice::Function("get_time".into()));
        let unknown = json!({"type": "function", "function": {"name": "nope"}});
        for bad in [
            json!({"tools": tools, "tool_choice": unknown}),
            json!({"tools": tools, "tool_choice": "sometimes"}),
            json!({"tool_choice": "required"}),
            json!({"tools": [{"type": "function", "function": {"name": ""}}]}),
            json!({"tools": [{"type": "retrieval"}]}),
            json!({"tools": "get_time"}),
            json!({"functions": [{"name": "f"}]}),
        ] {
            let e = parse_tools(&body(bad.clone())).unwrap_err();
            assert_eq!(e.status.as_u16(), 400, "{bad}");
        }
    }

    #[test]
    fn tool_turns_take_the_templates_roles() {
        let call = Message(
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_time", "arguments": "{\"timezone\": \"UTC\"}"}}]})
            .as_object()
            .unwrap()
            .clone(),
        );
        let result = Message::new("tool", "{\"time\": \"noon\"}");
        let v30 = granite_messages(
            vec![call.clone(), result.clone()],
            "{% if role == 'assistant_tool_call' %}",
        );
        assert_eq!(v30[0].role(), Some("assistant_tool_call"));
        assert_eq!(
            v30[0].content(),
            Some(r#"[{"name":"get_time","arguments":{"timezone":"UTC"}}]"#)
        );
        assert_eq!(v30[1].role(), Some("tool_response"));
        let v31 = granite_messages(vec![call], "{{ message['role'] }}");
        assert_eq!(v31[0].role(), Some("assistant"));
        assert_eq!(
            v31[0].content(),
            Some(r#"<|tool_call|>[{"name":"get_time","arguments":{"timezone":"UTC"}}]"#)
        );
    }

    #[test]
    fn the_forcing_grammar_names_each_tool() {
        let tools = [
            parse_tool(&json!({"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}}))
                .unwrap(),
            parse_tool(&json!({"type": "function", "function": {"name": "b"}})).unwrap(),
        ];
        let g = call_grammar(&tools, None, false);
        assert!(
            g.starts_with("start: <|tool_call|> \"[\" call \"]\"\ncall: tool_0 | tool_1\n"),
            "{g}"
        );
        let g = call_grammar(&tools, Some("b"), true);
        assert!(
            g.contains("call: tool_0\n")
                && g.contains("\"const\":\"b\"")
                && g.contains("(\",\" call)*")
        );
    }
}
