//! Chat templates rendered in a child process (`src/text/template_sandbox.rs`): Granite's own are recognised and
//! stay in-process; any other renders in the child exactly as it renders in-process (text, errors, clock,
//! special tokens), and what fuel cannot stop ends at the child's CPU limit.
//!
//! Isolation is process-wide, so this file turns it on once and keeps every test here under it.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};

use chrono::NaiveDate;
use quarry::text::chat_template::{ChatTemplate, Conversation, Message, SpecialTokens};
use quarry::text::template_sandbox;

fn isolate() {
    template_sandbox::isolate_untrusted_templates(env!("CARGO_BIN_EXE_quarry").into());
}

/// The real Granite template of `version` (3.0 or 3.1) from `../shared`, or None (skipped) without it.
fn granite(version: &str) -> Option<ChatTemplate> {
    let path = support::shared()
        .join(format!("granite-{version}-1b-a400m-instruct"))
        .join("tokenizer_config.json");
    if !path.exists() {
        support::skip::skipped(&format!("Granite {version}'s template"), &path);
        return None;
    }
    let json = std::fs::read_to_string(&path).unwrap();
    Some(ChatTemplate::from_tokenizer_config(&json, &path.display().to_string()).unwrap())
}

#[test]
fn granites_own_templates_render_in_process() {
    isolate();
    for version in ["3.0", "3.1"] {
        let Some(template) = granite(version) else {
            return;
        };
        assert!(
            !template.renders_isolated(),
            "Granite {version}'s template is not recognised"
        );
        let edited = ChatTemplate::new(&format!("{}{{# #}}", template.source()), "edited").unwrap();
        assert!(edited.renders_isolated(), "an edited {version} template");
    }
}

/// The same render in the child and in this process: the same text, or the same error.
fn same_both_ways(template: &ChatTemplate, conversation: &Conversation, what: &str) -> String {
    assert!(template.renders_isolated(), "{what}: not isolated");
    let shown = |r: Result<String, _>| {
        r.map_err(|e: quarry::text::chat_template::ChatTemplateError| e.to_string())
    };
    let isolated = shown(template.render(conversation, true));
    let here = shown(template.render_in_process(conversation, true));
    assert_eq!(isolated, here, "{what}");
    isolated.unwrap_or_else(|e| e)
}

#[test]
fn any_other_template_renders_in_the_child_exactly_as_in_process() {
    isolate();
    let mut tools = Conversation::from_messages(vec![
        Message::new("system", "Be brief."),
        Message::new("user", "héllo\u{0} <|end_of_text|> \u{1b}[31m"),
    ]);
    tools.tools = Some(vec![serde_json::json!({
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    })]);
    tools.documents = Some(vec![
        serde_json::json!({"title": "t", "text": "a document"}),
    ]);
    for version in ["3.0", "3.1"] {
        let Some(real) = granite(version) else {
            return;
        };
        let edited = ChatTemplate::new(&format!("{}{{# #}}", real.source()), "edited")
            .unwrap()
            .with_special_tokens(real.special_tokens().clone())
            .with_date(NaiveDate::from_ymd_opt(2026, 12, 4).unwrap());
        let text = same_both_ways(&edited, &tools, version);
        let real = real.with_date(NaiveDate::from_ymd_opt(2026, 12, 4).unwrap());
        assert_eq!(text, real.render(&tools, true).unwrap(), "{version}");
    }

    let hello = Conversation::from_messages(vec![Message::new("user", "hi")]);
    let cases = [
        (
            "the clock and special tokens",
            "{{ bos_token }}{{ strftime_now('%Y-%m-%d %H:%M') }}{{ eos_token }}",
            "<s>2026-12-04 13:45</s>",
        ),
        (
            "raise_exception",
            "{{ raise_exception('only one user turn') }}",
            "the chat template rejects this conversation: only one user turn",
        ),
        (
            "out of fuel",
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            "steps (a loop without a useful bound?)",
        ),
        (
            "a runtime error",
            "{{ messages[0].content.nope() }}",
            "rendering the chat template failed",
        ),
    ];
    for (what, source, expected) in cases {
        let template = ChatTemplate::new(source, what)
            .unwrap()
            .with_special_tokens(SpecialTokens {
                bos: Some("<s>".into()),
                eos: Some("</s>".into()),
                ..SpecialTokens::default()
            })
            .with_now(
                NaiveDate::from_ymd_opt(2026, 12, 4)
                    .unwrap()
                    .and_hms_opt(13, 45, 0)
                    .unwrap(),
            );
        let got = same_both_ways(&template, &hello, what);
        assert!(got.contains(expected), "{what}: {got}");
    }

    // A conversation the renderer refuses, and 40 MiB of output through the pipe.
    let plain = ChatTemplate::new(
        "{% for m in messages %}{{ m.content }}{% endfor %}",
        "plain",
    )
    .unwrap();
    let mut no_role = Message::new("user", "hi");
    no_role.0.remove("role");
    let no_role = Conversation::from_messages(vec![no_role]);
    let err = same_both_ways(&plain, &no_role, "a message without a role");
    assert!(err.contains("has no string \"role\""), "{err}");
    let mut reserved = hello.clone();
    reserved.extra.insert("tools".into(), serde_json::json!([]));
    let err = same_both_ways(&plain, &reserved, "a reserved variable");
    assert!(err.contains("is set by the renderer"), "{err}");
    let long = ChatTemplate::new(
        "{% for i in range(40) %}{{ 'x' * 1048576 }}{% endfor %}",
        "long",
    )
    .unwrap();
    assert_eq!(same_both_ways(&long, &hello, "long").len(), 40 << 20);
}

#[test]
fn what_fuel_cannot_see_ends_at_the_childs_cpu_limit() {
    isolate();
    let doubled = "{% set ns = namespace(s=[1]) %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}";
    let hello = Conversation::from_messages(vec![Message::new("user", "hi")]);
    let template = ChatTemplate::new(&format!("{doubled}{{{{ 2 in ns.s }}}}"), "doubled").unwrap();
    let started = std::time::Instant::now();
    let err = template.render(&hello, true).unwrap_err().to_string();
    assert!(
        err.contains(&format!(
            "more than {} s of CPU time",
            template_sandbox::CPU_SECONDS
        )),
        "{err}"
    );
    assert!(
        started.elapsed().as_secs() < template_sandbox::WALL_SECONDS + 2,
        "took {:?}",
        started.elapsed()
    );
}

/// Started by hand, the renderer says what it is and exits 2.
#[test]
fn the_renderer_started_by_hand_explains_itself() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_quarry"))
        .arg(template_sandbox::CHILD_ARGUMENT)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"{not json").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Quarry's own template renderer") && err.contains("not readable"),
        "{err}"
    );
}
