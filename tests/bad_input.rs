//! Corrupt, truncated or hostile inputs through the command line: each gives an error that names the file and
//! the problem, a non-zero exit that is not a panic, and leaves no output file behind.

mod support;

use std::path::Path;

use support::*;

/// Runs quarry and checks it failed cleanly with a message containing every one of `needles`.
fn fails_cleanly(args: &[&str], needles: &[&str]) -> String {
    let out = quarry("scalar", args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "quarry {args:?} succeeded on bad input"
    );
    assert_ne!(
        out.status.code(),
        Some(101),
        "quarry {args:?} panicked: {err}"
    );
    assert!(
        out.status.code().is_some(),
        "quarry {args:?} was killed by a signal: {err}"
    );
    assert!(!err.contains("panicked"), "quarry {args:?} panicked: {err}");
    for n in needles {
        assert!(
            err.contains(n),
            "quarry {args:?}: error {err:?} does not mention {n:?}"
        );
    }
    err
}

fn good_gguf() -> (Vec<u8>, quarry::gguf::GgufFile) {
    let dir = fixture_dir("granitemoe-dev-1").unwrap();
    let path = gguf("granitemoe-dev-1", &dir, "q8_0");
    (
        std::fs::read(&path).unwrap(),
        quarry::gguf::GgufFile::open(&path).unwrap(),
    )
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.to_str().unwrap().to_string()
}

/// Byte offset of a tensor's info record (its name's length prefix) in the header.
fn tensor_info_at(bytes: &[u8], name: &str) -> usize {
    let mut needle = (name.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(name.as_bytes());
    needle.extend_from_slice(&2u32.to_le_bytes()); // n_dims of a matrix
    bytes
        .windows(needle.len())
        .position(|w| w == needle.as_slice())
        .expect("tensor info in the header")
}

#[test]
fn corrupt_gguf_files_are_refused_with_a_named_problem() {
    let (good, file) = good_gguf();
    let dir = temp_dir("bad-gguf");
    let run = |path: &str, needles: &[&str]| {
        fails_cleanly(
            &["run", path, "--raw", "--prompt", "hi", "-n", "2"],
            &[&[path][..], needles].concat(),
        );
    };
    run(&write(&dir, "empty.gguf", b""), &["empty"]);
    run(
        &write(&dir, "truncated.gguf", &good[..good.len() / 2]),
        &["truncated"],
    );
    run(
        &write(&dir, "header-only.gguf", &good[..64]),
        &["truncated"],
    );
    let mut bad = good.clone();
    bad[..4].copy_from_slice(b"GGUX");
    run(&write(&dir, "magic.gguf", &bad), &["not a GGUF file"]);
    let mut bad = good.clone();
    bad[4..8].copy_from_slice(&9u32.to_le_bytes());
    run(&write(&dir, "version.gguf", &bad), &["version 9"]);
    let mut bad = good.clone();
    bad[8..16].copy_from_slice(&(1u64 << 62).to_le_bytes());
    run(&write(&dir, "tensor-count.gguf", &bad), &["tensor count"]);
    let mut bad = good.clone();
    bad[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    run(&write(&dir, "kv-count.gguf", &bad), &["key-value count"]);

    // The output projection of layer 0: its type id, then its offset, follow the two dimensions.
    let info = tensor_info_at(&good, "blk.0.attn_output.weight");
    let type_at = info + 8 + "blk.0.attn_output.weight".len() + 4 + 16;
    let mut bad = good.clone();
    bad[type_at..type_at + 4].copy_from_slice(&77u32.to_le_bytes());
    run(
        &write(&dir, "type-id.gguf", &bad),
        &["unknown ggml type id 77"],
    );
    let mut bad = good.clone();
    let beyond = (file.file_len() - file.data_offset + 64).next_multiple_of(32);
    bad[type_at + 4..type_at + 12].copy_from_slice(&beyond.to_le_bytes());
    run(
        &write(&dir, "past-end.gguf", &bad),
        &["extends past the end"],
    );
    // Its data moved onto the first tensor's bytes; then its type changed from Q8_0 to Q4_0, which reads only
    // part of its bytes (the rest a gap no writer leaves).
    let mut bad = good.clone();
    bad[type_at + 4..type_at + 12].copy_from_slice(&0u64.to_le_bytes());
    run(
        &write(&dir, "overlap.gguf", &bad),
        &["blk.0.attn_output.weight", "overlap"],
    );
    let mut bad = good.clone();
    assert_eq!(
        bad[type_at..type_at + 4],
        8u32.to_le_bytes(),
        "a Q8_0 tensor"
    );
    bad[type_at..type_at + 4].copy_from_slice(&2u32.to_le_bytes());
    run(
        &write(&dir, "type-size.gguf", &bad),
        &[
            "blk.0.attn_output.weight",
            "its type or shape does not match its data",
        ],
    );
    let norm = file.tensor("blk.1.ffn_norm.weight").unwrap();
    assert_eq!(norm.ty, quarry::gguf::GgmlType::F32);
    let mut bad = good.clone();
    let at = norm.offset as usize + 4 * 5;
    bad[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    run(
        &write(&dir, "nan-norm.gguf", &bad),
        &["blk.1.ffn_norm.weight", "NaN at index 5", "finite"],
    );
    let mut bad = good.clone();
    let dims_at = info + 8 + "blk.0.attn_output.weight".len() + 4;
    bad[dims_at..dims_at + 8].copy_from_slice(&(!31u64).to_le_bytes());
    run(
        &write(&dir, "huge-dims.gguf", &bad),
        &["blk.0.attn_output.weight"],
    );

    // Random bytes and a GGUF of another architecture.
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    run(&write(&dir, "random.gguf", &noise), &["not a GGUF file"]);
}

#[test]
fn wrong_architecture_and_missing_files_are_clear() {
    let dir = temp_dir("bad-arch");
    let meta = vec![(
        "general.architecture".to_string(),
        quarry::gguf::Value::String("llama".into()),
    )];
    let mut w = quarry::gguf::GgufWriter::new(Vec::new(), &meta, vec![]).unwrap();
    w.write_data(&[]).ok();
    let bytes = w.finish().unwrap();
    let path = write(&dir, "llama.gguf", &bytes);
    fails_cleanly(
        &["run", &path, "--raw", "--prompt", "hi"],
        &[&path, "architecture 'llama' is not supported"],
    );
    let missing = dir.join("nope.gguf");
    fails_cleanly(
        &["info", missing.to_str().unwrap()],
        &["nope.gguf", "No such file"],
    );
}

#[test]
fn prompts_longer_than_the_context_and_bad_ids_are_refused() {
    let dir = fixture_dir("granitemoe-dev-1").unwrap();
    let model = gguf("granitemoe-dev-1", &dir, "q8_0");
    let m = model.to_str().unwrap();
    let long = vec!["5"; 40].join(",");
    fails_cleanly(
        &[
            "run",
            m,
            "--prompt-ids",
            &long,
            "--ctx-size",
            "16",
            "-n",
            "1",
        ],
        &["40 tokens", "16"],
    );
    fails_cleanly(
        &["logits", m, "--prompt-ids", "1,99999", "--out", "/dev/null"],
        &["99999", "outside the vocabulary"],
    );
    fails_cleanly(
        &["run", m, "--prompt-ids", "1,x"],
        &["'x' is not a token id"],
    );
    fails_cleanly(
        &["run", m, "--prompt-ids", "1", "--ctx-size", "999999"],
        &["--ctx-size"],
    );
}

/// Each broken checkpoint folder: the converter names the file and the problem and leaves neither the output
/// nor its `.part` behind.
#[test]
fn broken_checkpoints_are_refused_without_leaving_output() {
    let src = fixture_dir("granitemoe-dev-2").unwrap();
    let copy = |tag: &str| {
        let d = temp_dir(tag);
        for e in std::fs::read_dir(&src).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
        d
    };
    let check = |dir: &Path, needles: &[&str]| {
        let out = dir.join("out.gguf");
        fails_cleanly(
            &[
                "quantize",
                dir.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
                "--type",
                "q8_0",
            ],
            needles,
        );
        assert!(!out.exists(), "{} left behind", out.display());
        assert!(
            !dir.join("out.gguf.part").exists(),
            "a .part file left behind in {}",
            dir.display()
        );
    };
    let d = copy("truncated-st");
    let st = d.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    check(&d, &["model.safetensors"]);
    let d = copy("no-config");
    std::fs::remove_file(d.join("config.json")).unwrap();
    check(&d, &["config.json"]);
    let d = copy("bad-config");
    std::fs::write(d.join("config.json"), "{ not json").unwrap();
    check(&d, &["config.json"]);
    let d = copy("llama-config");
    let cfg = std::fs::read_to_string(d.join("config.json"))
        .unwrap()
        .replace("GraniteMoeForCausalLM", "LlamaForCausalLM");
    std::fs::write(d.join("config.json"), cfg).unwrap();
    check(&d, &["config.json", "LlamaForCausalLM"]);
    let d = copy("no-tokenizer");
    std::fs::remove_file(d.join("tokenizer.json")).unwrap();
    check(&d, &["tokenizer.json"]);

    // An OS error is printed once, though the converter's message quotes it and also carries it as its cause.
    let d = copy("config-dir");
    std::fs::remove_file(d.join("config.json")).unwrap();
    std::fs::create_dir(d.join("config.json")).unwrap();
    let out = d.join("out.gguf");
    let err = fails_cleanly(
        &["quantize", d.to_str().unwrap(), "-o", out.to_str().unwrap()],
        &["config.json", "Is a directory"],
    );
    assert_eq!(err.matches("os error 21").count(), 1, "{err}");

    // Folders that would convert but never run: refused before conversion, naming the file.
    let d = copy("bad-template");
    std::fs::write(
        d.join("chat_template.jinja"),
        "{% for m in messages %}{{ m.content }",
    )
    .unwrap();
    check(&d, &["chat_template.jinja", "does not compile"]);
    let d = copy("bad-template-config");
    let config_path = d.join("tokenizer_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["chat_template"] = "{% if messages %}unclosed".into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    check(&d, &["tokenizer_config.json", "does not compile"]);
    let d = copy("panicking-tokenizer");
    let tokenizer_path = d.join("tokenizer.json");
    let mut tokenizer: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tokenizer_path).unwrap()).unwrap();
    tokenizer["normalizer"] =
        serde_json::json!({"type": "Precompiled", "precompiled_charsmap": "AAAA"});
    std::fs::write(&tokenizer_path, tokenizer.to_string()).unwrap();
    check(&d, &["tokenizer.json", "the tokenizer library failed"]);
}

/// One rule for `--threads` in every command: 1 to 512, refused before any work otherwise (a count in the
/// hundreds of thousands used to spend minutes creating threads).
#[test]
fn every_command_refuses_an_unreasonable_thread_count() {
    let commands: [&[&str]; 12] = [
        &["run", "m.gguf", "--prompt", "Hi"],
        &["chat", "m.gguf"],
        &["serve", "m.gguf"],
        &[
            "batch",
            "m.gguf",
            "--input",
            "in.jsonl",
            "--output",
            "out.jsonl",
        ],
        &["bench", "m.gguf"],
        &["perplexity", "m.gguf", "--file", "t.txt"],
        &["logits", "m.gguf", "--prompt-ids", "1", "--out", "o.bin"],
        &["quantize", "dir", "-o", "o.gguf"],
        &["pull", "granite-3.0-1b-a400m-instruct"],
        &["import", "dir"],
        &["synth", "granite-3.0-1b-a400m-instruct", "-o", "o.gguf"],
        &["bench", "m.gguf", "-t", "1,2,0"],
    ];
    for cmd in commands {
        for bad in ["100000", "0", "many"] {
            let mut args = cmd.to_vec();
            if !args.contains(&"-t") {
                args.extend(["--threads", bad]);
            }
            let want = match (args.contains(&"1,2,0"), bad) {
                (true, _) => "0 threads is outside 1..=512",
                (_, "many") => "'many' is not a number of threads",
                _ => "threads is outside 1..=512",
            };
            fails_cleanly(&args, &[want]);
        }
    }
}

/// Files handed to quarry as text are read with bounds: a device (`/dev/zero` grew `/load` to 19 GB) or a
/// directory is refused by what it is, not reported missing; a file larger than its purpose is refused before it
/// is read.
#[test]
fn devices_directories_and_oversized_files_are_refused_as_text_inputs() {
    let dir = fixture_dir("granitemoe-dev-1").unwrap();
    let model = gguf("granitemoe-dev-1", &dir, "q8_0");
    let m = model.to_str().unwrap();
    let tmp = temp_dir("bad-text-inputs");
    let big = tmp.join("big.json");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(33 << 20).unwrap(); // sparse: 33 MiB without writing them
    let d = tmp.to_str().unwrap();
    for (args, want) in [
        (
            vec!["tokenize", m, "--chat", "/dev/zero"],
            "/dev/zero is a device, pipe or socket, not a regular file",
        ),
        (
            vec!["tokenize", m, "--chat", d],
            "is a directory, not a regular file",
        ),
        (
            vec!["tokenize", m, "--chat", big.to_str().unwrap()],
            "larger than 33554432 bytes, more than a conversation file can be",
        ),
        (
            vec!["perplexity", m, "--file", "/dev/zero"],
            "not a regular file; give the path of a text to score",
        ),
    ] {
        let err = fails_cleanly(&args, &[want]);
        assert!(!err.contains("No such file"), "{err}");
    }
}

/// A prompt too long for the context by its size alone is refused before it is tokenized (a 10 MB prompt cost
/// 1.5 GB of memory only to be refused).
#[test]
fn a_prompt_far_longer_than_the_context_is_refused_before_tokenizing() {
    let dir = fixture_dir("granitemoe-dev-1").unwrap();
    let model = gguf("granitemoe-dev-1", &dir, "q8_0");
    let tmp = temp_dir("huge-prompt");
    let prompt = tmp.join("prompt.txt");
    std::fs::write(&prompt, "granite ".repeat(1 << 20)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_quarry"))
        .args(["run", model.to_str().unwrap(), "--raw", "--ctx-size", "64"])
        .stdin(std::fs::File::open(&prompt).unwrap())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("the text is 8388608 bytes: more than 64 tokens can hold"),
        "{err}"
    );
}

/// Text from a file reaches the terminal escaped: an escape sequence in `general.name` (shown by `info`) or in
/// `general.architecture` (quoted by the error refusing it) is printed as `\u{1b}`, never as the raw byte.
#[test]
fn escape_sequences_in_metadata_never_reach_the_terminal() {
    let (good, _) = good_gguf();
    let dir = temp_dir("escape-metadata");
    let patch = |bytes: &[u8], from: &[u8], to: &[u8]| -> Vec<u8> {
        assert_eq!(from.len(), to.len());
        let at = bytes
            .windows(from.len())
            .position(|w| w == from)
            .expect("the string in the header");
        let mut out = bytes.to_vec();
        out[at..at + to.len()].copy_from_slice(to);
        out
    };
    let named = write(
        &dir,
        "named.gguf",
        &patch(&good, b"granitemoe-dev-1", b"\x1b]0;pwned\x07-dev-1"),
    );
    let out = quarry("scalar", &["info", &named, "-v"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains('\u{1b}') && !text.contains('\u{7}'),
        "{text}"
    );
    assert!(text.contains("\\u{1b}]0;pwned\\u{7}-dev-1"), "{text}");

    // The architecture value is the first "granitemoe" that is not part of a key.
    let arch_key = b"general.architecture";
    let at = good
        .windows(arch_key.len())
        .position(|w| w == arch_key)
        .unwrap();
    let mut bad = good.clone();
    let value = at + arch_key.len() + 4 + 8; // value type (u32) and string length (u64)
    bad[value..value + 10].copy_from_slice(b"\x1b[2Jgranit");
    let arch = write(&dir, "arch.gguf", &bad);
    let err = fails_cleanly(&["info", &arch], &["\\u{1b}[2Jgranit"]);
    assert!(!err.contains('\u{1b}'), "{err}");
}

/// A negative sampling value is read as a value and refused for what it is, not taken for an unknown flag.
#[test]
fn negative_sampling_values_are_refused_by_name() {
    let dir = fixture_dir("granitemoe-dev-1").unwrap();
    let model = gguf("granitemoe-dev-1", &dir, "q8_0");
    let m = model.to_str().unwrap();
    for (flag, value, want) in [
        ("--temperature", "-1", "temperature -1 must be 0 or more"),
        ("--top-p", "-0.5", "top-p -0.5 must be between 0 and 1"),
        (
            "--repeat-penalty",
            "-1",
            "repeat penalty -1 must be more than 0",
        ),
        ("--top-k", "-1", "invalid value '-1' for '--top-k"),
        ("--seed", "-3", "invalid value '-3' for '--seed"),
    ] {
        let err = fails_cleanly(&["run", m, "--prompt", "hi", flag, value], &[want]);
        assert!(!err.contains("unexpected argument"), "{err}");
    }
}

/// Metadata that parses but is wrong is refused at load, naming the key or tensor: a RoPE base that is NaN,
/// infinite, zero or negative (it used to be replaced silently by 10000), and a block_count smaller than the
/// layers the file holds (the rest were ignored).
#[test]
fn wrong_metadata_values_are_refused_by_name() {
    let (good, _) = good_gguf();
    let dir = temp_dir("wrong-metadata");
    // The value of a scalar key: after the key's bytes, its u32 type tag, then the value.
    let value_at = |key: &str| -> usize {
        let k = key.as_bytes();
        good.windows(k.len()).position(|w| w == k).unwrap() + k.len() + 4
    };
    let rope = value_at("granitemoe.rope.freq_base");
    for (name, theta, want) in [
        ("nan", f32::NAN, "rope.freq_base = NaN is not finite"),
        ("inf", f32::INFINITY, "is not finite"),
        ("zero", 0.0, "rope.freq_base = 0 must be a positive number"),
        (
            "negative",
            -5.0,
            "rope.freq_base = -5 must be a positive number",
        ),
    ] {
        let mut bad = good.clone();
        bad[rope..rope + 4].copy_from_slice(&theta.to_le_bytes());
        let path = write(&dir, &format!("rope-{name}.gguf"), &bad);
        fails_cleanly(
            &["run", &path, "--raw", "--prompt", "hi", "-n", "1"],
            &[want],
        );
    }
    let blocks = value_at("granitemoe.block_count");
    let n = u32::from_le_bytes(good[blocks..blocks + 4].try_into().unwrap());
    assert!(n >= 2, "the fixture has {n} layers");
    let mut bad = good.clone();
    bad[blocks..blocks + 4].copy_from_slice(&(n - 1).to_le_bytes());
    let path = write(&dir, "blocks.gguf", &bad);
    fails_cleanly(
        &["run", &path, "--raw", "--prompt", "hi", "-n", "1"],
        &[&format!(
            "belongs to layer {}, but granitemoe.block_count is {}",
            n - 1,
            n - 1
        )],
    );
}

/// A tokenizer with fewer tokens than the model has logits is refused when the model is opened for text (the
/// model could choose an id the tokenizer cannot write, and the reply would fail midway).
#[test]
fn a_tokenizer_smaller_than_the_vocabulary_is_refused() {
    let src = fixture_dir("granitemoe-dev-1").unwrap();
    let d = temp_dir("small-tokenizer");
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
    }
    let path = d.join("tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    tok["added_tokens"].as_array_mut().unwrap().pop();
    std::fs::write(&path, tok.to_string()).unwrap();
    let out = d.join("out.gguf");
    let o = out.to_str().unwrap();
    let conv = quarry(
        "scalar",
        &["quantize", d.to_str().unwrap(), "-o", o, "--type", "q8_0"],
    );
    assert!(
        conv.status.success(),
        "{}",
        String::from_utf8_lossy(&conv.stderr)
    );
    fails_cleanly(
        &["run", o, "--prompt", "hi", "-n", "1"],
        &["has 399 tokens but the model's output has 400"],
    );
}

/// Three `tokenizer.json` files on which the `tokenizers` crate panics (tokenizers 0.23: an invalid Precompiled
/// normalizer at load; a post-processor naming a token it does not define, and a zero-length split, at the
/// first encoding): each is an error naming the file when the model is opened, never a panic.
#[test]
fn tokenizers_that_make_the_tokenizer_library_panic_are_errors_naming_the_file() {
    let (_, good) = good_gguf();
    let json = good
        .get(quarry::text::tokenizer::GGUF_HF_JSON_KEY)
        .and_then(quarry::gguf::Value::as_str)
        .unwrap()
        .to_string();
    let dir = temp_dir("tokenizer-panics");
    for (name, field, value) in [
        (
            "precompiled",
            "normalizer",
            serde_json::json!({"type": "Precompiled", "precompiled_charsmap": "AAAA"}),
        ),
        (
            "template",
            "post_processor",
            serde_json::json!({"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}], "pair": [], "special_tokens": {}}),
        ),
        (
            "fixed-length",
            "pre_tokenizer",
            serde_json::json!({"type": "FixedLength", "length": 0}),
        ),
    ] {
        let mut tokenizer: serde_json::Value = serde_json::from_str(&json).unwrap();
        tokenizer[field] = value;
        let tokenizer = tokenizer.to_string();
        let err = quarry::text::tokenizer::Tokenizer::from_json_str(&tokenizer)
            .err()
            .unwrap_or_else(|| panic!("{name}: the tokenizer loaded"))
            .to_string();
        assert!(
            err.contains("the tokenizer library failed"),
            "{name}: {err}"
        );

        let bytes =
            with_string_metadata(&good, quarry::text::tokenizer::GGUF_HF_JSON_KEY, &tokenizer);
        let path = write(&dir, &format!("{name}.gguf"), &bytes);
        fails_cleanly(
            &["run", &path, "--raw", "--prompt", "hi", "-n", "2"],
            &[&path, "the tokenizer library failed"],
        );
    }
}

/// A chat template is a program that comes with the file. One that is not Granite's own renders in a child
/// process with CPU and memory limits: the hostile ones fuel cannot see (a list doubled sixty times, then
/// searched or measured: minijinja walks 2^60 items inside one operator) end with an error naming the limit,
/// within seconds, and a benign template that is not Granite's renders exactly as Granite's own does in-process.
#[test]
fn chat_templates_that_are_not_granites_own_render_within_cpu_and_memory_limits() {
    let (_, good) = good_gguf();
    let key = quarry::text::chat_template::GGUF_CHAT_TEMPLATE_KEY;
    let granite = good
        .get(key)
        .and_then(quarry::gguf::Value::as_str)
        .unwrap()
        .to_string();
    assert!(quarry::text::template_sandbox::is_trusted(&granite));
    let dir = temp_dir("isolated-templates");
    let doubled = "{% set ns = namespace(s=[1]) %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}";
    for (name, template, needle) in [
        (
            "search",
            format!("{doubled}{{{{ 2 in ns.s }}}}"),
            "chat template",
        ),
        (
            "length",
            format!("{doubled}{{{{ ns.s | length }}}}"),
            "chat template",
        ),
        (
            "nested-loops",
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
                .to_string(),
            "steps (a loop without a useful bound?)",
        ),
    ] {
        let path = write(
            &dir,
            &format!("{name}.gguf"),
            &with_string_metadata(&good, key, &template),
        );
        let started = std::time::Instant::now();
        let err = fails_cleanly(&["run", &path, "--prompt", "hi", "-n", "1"], &[needle]);
        // The kernel's CPU limit (5 s) and the parent's clock (20 s) bound it, on any load.
        assert!(
            started.elapsed().as_secs() < 25,
            "{name}: took {:?}",
            started.elapsed()
        );
        if name != "nested-loops" {
            assert!(
                err.contains("s of CPU time") || err.contains("MiB of memory"),
                "{name}: {err}"
            );
        }
    }

    // The same text with a comment added is no longer Granite's own: it renders in a child, identically.
    let edited = write(
        &dir,
        "edited.gguf",
        &with_string_metadata(&good, key, &format!("{granite}{{# edited #}}")),
    );
    let chat = dir.join("chat.json");
    std::fs::write(
        &chat,
        r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo\u0000 <|end_of_text|>"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}"#,
    )
    .unwrap();
    let original = write(
        &dir,
        "original.gguf",
        &with_string_metadata(&good, key, &granite),
    );
    let tokens = |model: &str| {
        quarry_ok(
            "scalar",
            &[
                "tokenize",
                model,
                "--chat",
                chat.to_str().unwrap(),
                "--format",
                "json",
            ],
        )
    };
    assert_eq!(tokens(&edited), tokens(&original));
}
