//! `models.toml` against the real files it describes, kept in `../shared` (copies of the Hugging Face repos
//! without the weights). Here rather than beside the registry's own unit tests because it needs `../shared`, and so
//! follows the skip rule of `support/skip.rs`.

mod support;

use quarry::hub::registry::Registry;
use sha2::Digest;

/// The checksums of the 1B models' small files are those of the real files kept in `../shared`; checked here when
/// that folder is present.
#[test]
fn registry_checksums_match_the_real_files_when_present() {
    let r = Registry::builtin();
    let shared = support::shared();
    let mut checked = 0;
    for m in &r.models {
        let dir = shared.join(&m.name);
        if !dir.is_dir() {
            continue;
        }
        for f in &m.files {
            let (Some(size), Some(sha)) = (f.size, &f.sha256) else {
                continue;
            };
            let bytes = std::fs::read(dir.join(&f.name))
                .unwrap_or_else(|e| panic!("{}/{}: {e}", m.name, f.name));
            assert_eq!(bytes.len() as u64, size, "{}/{} size", m.name, f.name);
            let got = format!("{:x}", sha2::Sha256::digest(&bytes));
            assert_eq!(&got, sha, "{}/{} sha256", m.name, f.name);
            checked += 1;
        }
    }
    if checked == 0 {
        support::skipped("registry checksums", &shared);
    }
}
