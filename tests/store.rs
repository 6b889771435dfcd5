//! The model store through the command line, with no network: `import` of a local folder, MODEL names in every
//! command that takes one, `list`, `rm`, and the errors for names that are not installed.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use support::{fixture_dir, gguf, temp_dir};

fn quarry(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_quarry"))
        .args(args)
        .env("QUARRY_HOME", home)
        // Any attempt to reach the network would fail at once.
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .expect("quarry runs")
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "quarry failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn fails(o: Output, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "expected a clean failure: {err}");
    for n in needles {
        assert!(err.contains(n), "error does not mention {n:?}: {err}");
    }
    err
}

#[test]
fn import_installs_a_folder_that_every_command_then_finds_by_name() {
    let home = temp_dir("store-import");
    let dir = fixture_dir("granite-dense-dev").unwrap();
    let out = ok(quarry(
        &home,
        &[
            "import",
            dir.to_str().unwrap(),
            "--name",
            "dense",
            "--type",
            "q8_0",
        ],
    ));
    assert!(out.contains("installed dense"), "{out}");
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(home.join("models/dense/manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["type"], "q8_0");
    assert_eq!(manifest["architecture"], "granite");
    assert!(manifest["repo"].is_null());
    assert!(
        manifest["imported_from"]
            .as_str()
            .unwrap()
            .ends_with("granite-dense-dev")
    );
    let sha = |name: &str| {
        manifest["files"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .map(|f| f["sha256"].as_str().unwrap().to_string())
    };
    use sha2::Digest;
    assert_eq!(
        sha("model.safetensors"),
        Some(format!(
            "{:x}",
            sha2::Sha256::digest(std::fs::read(dir.join("model.safetensors")).unwrap())
        ))
    );
    assert_eq!(
        sha("logits_chat.npy"),
        None,
        "only the files a conversion reads"
    );

    // The installed file is the converter's output for that folder (named after the model).
    let reference = quarry::gguf::GgufFile::open(gguf("granite-dense-dev", &dir, "q8_0")).unwrap();
    let installed = quarry::gguf::GgufFile::open(home.join("models/dense/model.gguf")).unwrap();
    assert_eq!(reference.tensors().len(), installed.tensors().len());
    for (a, b) in reference.tensors().iter().zip(installed.tensors()) {
        assert_eq!((&a.name, &a.dims, a.ty), (&b.name, &b.dims, b.ty));
        assert!(
            *reference.tensor_data(a) == *installed.tensor_data(b),
            "{}",
            a.name
        );
    }

    // Every command that takes a MODEL finds it by name.
    ok(quarry(
        &home,
        &[
            "run",
            "dense",
            "--prompt",
            "Hi",
            "-n",
            "3",
            "--temperature",
            "0",
        ],
    ));
    ok(quarry(&home, &["info", "dense"]));
    ok(quarry(&home, &["tokenize", "dense", "--text", "Hello"]));
    let npy = home.join("l.npy");
    ok(quarry(
        &home,
        &[
            "logits",
            "dense",
            "--prompt-ids",
            "1,2,3",
            "--out",
            npy.to_str().unwrap(),
        ],
    ));
    ok(quarry(
        &home,
        &["bench", "dense", "-p", "8", "-n", "4", "-r", "1"],
    ));

    // Piped stdin is the prompt; the newline `echo` adds is not part of the message.
    let mut child = Command::new(env!("CARGO_BIN_EXE_quarry"))
        .args([
            "run",
            "dense",
            "-n",
            "3",
            "--temperature",
            "0",
            "--format",
            "json",
        ])
        .env("QUARRY_HOME", &home)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"Hi\n").unwrap();
    let piped = child.wait_with_output().unwrap();
    assert!(piped.status.success());
    let piped: serde_json::Value = serde_json::from_slice(&piped.stdout).unwrap();
    let direct: serde_json::Value = serde_json::from_str(&ok(quarry(
        &home,
        &[
            "run",
            "dense",
            "--prompt",
            "Hi",
            "-n",
            "3",
            "--temperature",
            "0",
            "--format",
            "json",
        ],
    )))
    .unwrap();
    assert_eq!(piped["prompt_ids"], direct["prompt_ids"]);

    let list = ok(quarry(&home, &["list"]));
    let header: Vec<&str> = list.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "TYPE", "SIZE", "MODIFIED"], "{list}");
    let row = list.lines().find(|l| l.starts_with("dense ")).expect(&list);
    assert!(
        row.contains("q8_0") && row.contains("KiB") && row.ends_with("just now"),
        "{list}"
    );

    // Importing over an installed name is refused without --force, and then replaces it whole.
    fails(
        quarry(&home, &["import", dir.to_str().unwrap(), "--name", "dense"]),
        &["'dense' is already installed (q8_0", "--force"],
    );
    ok(quarry(
        &home,
        &[
            "import",
            dir.to_str().unwrap(),
            "--name",
            "dense",
            "--force",
        ],
    ));
    assert!(
        std::fs::read_to_string(home.join("models/dense/manifest.json"))
            .unwrap()
            .contains("\"type\": \"q4_0\"")
    );

    let removed = ok(quarry(&home, &["rm", "dense"]));
    assert!(removed.contains("removed"), "{removed}");
    assert!(!home.join("models/dense").exists());
    fails(
        quarry(&home, &["run", "dense", "--prompt", "Hi"]),
        &["'dense'", "quarry list"],
    );
}

/// `GET path` over plain HTTP/1.1: the status and the body.
fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, body.to_string()))
}

/// `quarry serve` without MODEL serves the registry's default model once it is installed, under its name; before,
/// it says which pull to run.
#[test]
fn serve_without_a_model_serves_the_installed_default() {
    let home = temp_dir("store-serve-default");
    fails(
        quarry(&home, &["serve", "--port", "1"]),
        &["quarry pull granite-3.0-1b-a400m-instruct"],
    );
    let dir = fixture_dir("granite-dense-dev").unwrap();
    let name = "granite-3.0-1b-a400m-instruct";
    // A stand-in under the registry's name: --force, as the folder is not that model.
    ok(quarry(
        &home,
        &[
            "import",
            dir.to_str().unwrap(),
            "--name",
            name,
            "--type",
            "q8_0",
            "--force",
        ],
    ));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_quarry"))
        .args(["serve", "--port", &port.to_string(), "--ctx-size", "64"])
        .env("QUARRY_HOME", &home)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let models = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the server did not become healthy"
        );
        assert!(child.try_wait().unwrap().is_none(), "the server exited");
        if let Ok((200, _)) = http_get(port, "/health") {
            break http_get(port, "/v1/models").unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(models.0, 200, "{}", models.1);
    let v: serde_json::Value = serde_json::from_str(&models.1).unwrap();
    assert_eq!(v["data"][0]["id"], name, "{v}");
}

#[test]
fn names_that_are_not_installed_say_what_to_do() {
    let home = temp_dir("store-missing");
    fails(
        quarry(
            &home,
            &["run", "granite-3.1-1b-a400m-instruct", "--prompt", "Hi"],
        ),
        &["quarry pull granite-3.1-1b-a400m-instruct", "quarry import"],
    );
    fails(
        quarry(&home, &["info", "ibm-granite/granite-3.0-8b-instruct"]),
        &["quarry pull ibm-granite/granite-3.0-8b-instruct"],
    );
    fails(
        quarry(&home, &["bench", "missing.gguf"]),
        &["missing.gguf", "No such file"],
    );
    let dir = fixture_dir("granitemoe-dev-2").unwrap();
    fails(
        quarry(&home, &["run", dir.to_str().unwrap(), "--prompt", "Hi"]),
        &["Hugging Face model folder", "quarry import"],
    );
    fails(
        quarry(&home, &["rm", "nothing"]),
        &["no installed model", "nothing"],
    );
    fails(
        quarry(
            &home,
            &["import", dir.to_str().unwrap(), "--name", "../evil"],
        ),
        &["cannot be a model name"],
    );
    let empty = temp_dir("store-empty-folder");
    fails(
        quarry(&home, &["import", empty.to_str().unwrap(), "--name", "x"]),
        &["config.json"],
    );
    assert!(
        !home.join("models").exists()
            || std::fs::read_dir(home.join("models"))
                .unwrap()
                .next()
                .is_none()
    );
}

#[test]
fn list_shows_the_registry_and_where_the_store_is() {
    let home = temp_dir("store-list");
    let empty = ok(quarry(&home, &["list"]));
    assert!(
        empty.contains("no models installed") && empty.contains(home.to_str().unwrap()),
        "{empty}"
    );
    assert!(empty.contains("quarry list --available"), "{empty}");
    let text = ok(quarry(&home, &["list", "--available"]));
    for name in [
        "granite-3.0-1b-a400m-instruct",
        "granite-3.1-1b-a400m-instruct",
        "granite-3.0-3b-a800m-instruct",
        "granite-3.1-8b-instruct",
    ] {
        assert!(text.contains(name), "{text}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&ok(quarry(&home, &["list", "--format", "json"]))).unwrap();
    assert_eq!(json["registry"].as_array().unwrap().len(), 8);
    assert!(json["registry"][0]["installed"].is_null());
    assert_eq!(json["installed"].as_array().unwrap().len(), 0);
}

/// A store folder that cannot be written (even by root: the path, or its parent, is a regular file) is refused
/// before any checksumming or conversion, naming the folder.
#[test]
fn import_into_a_store_that_cannot_be_written_fails_before_converting() {
    let dir = fixture_dir("granitemoe-dev-2").unwrap();
    let base = temp_dir("store-unwritable");
    let file = base.join("not-a-folder");
    std::fs::write(&file, b"x").unwrap();
    for home in [file.clone(), file.join("store")] {
        let err = fails(
            quarry(&home, &["import", dir.to_str().unwrap(), "--name", "m"]),
            &[home.to_str().unwrap(), "cannot be written", "QUARRY_HOME"],
        );
        assert!(
            !err.contains("checksumming") && !err.contains("converting"),
            "the check comes first: {err}"
        );
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }
}

/// A folder whose chat template does not compile is refused before conversion, naming the file; nothing is
/// installed.
#[test]
fn import_refuses_a_folder_whose_chat_template_does_not_compile() {
    let fixture = fixture_dir("granitemoe-dev-2").unwrap();
    let dir = temp_dir("store-bad-template").join("snapshot");
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(&fixture).unwrap().flatten() {
        if e.path().is_file() {
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
    }
    let jinja = dir.join("chat_template.jinja");
    std::fs::write(&jinja, "{% for m in messages %}{{ m.content }").unwrap();
    let home = temp_dir("store-bad-template-home");
    let err = fails(
        quarry(&home, &["import", dir.to_str().unwrap(), "--name", "zebra"]),
        &[jinja.to_str().unwrap()],
    );
    assert!(!err.contains("converting"), "{err}");
    assert!(
        !home.join("models").exists()
            || std::fs::read_dir(home.join("models"))
                .unwrap()
                .next()
                .is_none(),
        "something was installed"
    );
    assert!(!home.join("models/zebra").exists());
    let list = ok(quarry(&home, &["list"]));
    assert!(!list.contains("zebra"), "{list}");

    // The same folder with a template that compiles imports.
    std::fs::write(&jinja, "{% for m in messages %}{{ m.content }}{% endfor %}").unwrap();
    ok(quarry(
        &home,
        &["import", dir.to_str().unwrap(), "--name", "zebra"],
    ));
    ok(quarry(&home, &["info", "zebra"]));
}

#[test]
fn import_under_a_registry_name_checks_the_folder_is_that_model() {
    let home = temp_dir("store-registry-name");
    let dir = fixture_dir("granitemoe-dev-1").unwrap();
    let name = "granite-3.0-1b-a400m-instruct";
    let err = fails(
        quarry(&home, &["import", dir.to_str().unwrap(), "--name", name]),
        &[
            &format!("'{name}' is a registry model"),
            "hidden size 64, the registry's 1024",
            "--force",
        ],
    );
    assert!(!err.contains("converting"), "the check comes first: {err}");
    assert!(!home.join("models").join(name).exists());
    // --force installs it anyway, as asked.
    ok(quarry(
        &home,
        &[
            "import",
            dir.to_str().unwrap(),
            "--name",
            name,
            "--force",
            "--type",
            "q8_0",
        ],
    ));
    assert!(home.join("models").join(name).join("model.gguf").is_file());
}

#[test]
fn import_installs_a_gguf_file_as_it_is() {
    let home = temp_dir("store-import-gguf");
    let dir = fixture_dir("granitemoe-dev-2").unwrap();
    let file = gguf("granitemoe-dev-2", &dir, "q8_0");
    let out = ok(quarry(
        &home,
        &["import", file.to_str().unwrap(), "--name", "two"],
    ));
    assert!(out.contains("installed two (granitemoe, q8_0"), "{out}");
    assert_eq!(
        std::fs::read(home.join("models/two/model.gguf")).unwrap(),
        std::fs::read(&file).unwrap(),
        "the installed file is the imported one, byte for byte"
    );
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(home.join("models/two/manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        manifest["files"][0]["size"],
        std::fs::metadata(&file).unwrap().len()
    );
    assert_eq!(manifest["files"][0]["sha256"].as_str().unwrap().len(), 64);
    let text = ok(quarry(
        &home,
        &["run", "two", "hello", "-n", "2", "--temperature", "0"],
    ));
    assert!(!text.trim().is_empty());
    // A GGUF is not converted on the way in; a file that is not a model is refused, and nothing installed.
    fails(
        quarry(
            &home,
            &[
                "import",
                file.to_str().unwrap(),
                "--name",
                "t",
                "--type",
                "q4_0",
            ],
        ),
        &["installed as it is", "quarry quantize"],
    );
    let junk = temp_dir("store-junk").join("junk.gguf");
    std::fs::write(&junk, b"GGUF but not really").unwrap();
    fails(
        quarry(&home, &["import", junk.to_str().unwrap()]),
        &["junk.gguf"],
    );
    assert!(!home.join("models/junk").exists());
    let list = ok(quarry(&home, &["list"]));
    assert!(!list.contains("junk"), "{list}");
}

#[test]
fn show_prints_parameters_sizes_template_and_license() {
    let home = temp_dir("store-show");
    let dir = fixture_dir("granitemoe-dev-1").unwrap();
    ok(quarry(
        &home,
        &[
            "import",
            dir.to_str().unwrap(),
            "--name",
            "one",
            "--type",
            "q8_0",
        ],
    ));
    let text = ok(quarry(&home, &["show", "one"]));
    for needle in [
        "  Model",
        "architecture        granitemoe",
        "context length      1024",
        "experts             16 per layer, 4 used per token",
        "  Parameters",
        "temperature         0.8",
        "  Sizes",
        "q8_0 weights",
        "  Installed",
        "  Chat template",
        "<|start_of_role|>",
        "  License",
    ] {
        assert!(text.contains(needle), "show lacks {needle:?}: {text}");
    }
    let template = ok(quarry(&home, &["show", "one", "--template"]));
    assert!(
        template.starts_with("{%") || template.contains("{{"),
        "{template}"
    );
    assert!(!template.contains("  Model"), "{template}");
    let license = ok(quarry(&home, &["show", "one", "--license"]));
    assert!(!license.trim().is_empty());
}
