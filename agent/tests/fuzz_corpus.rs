//! Replays every seed (and every saved crash) of the fuzz corpora through the same calls as
//! the fuzz targets, on the stable compiler, so `cargo test` keeps what fuzzing found fixed.

#[path = "../../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod harness;

use std::path::Path;

#[test]
fn every_corpus_file_is_handled_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (name, target) in harness::TARGETS {
        let dir = root.join(name);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("corpus entry").path())
            .collect();
        files.sort();
        assert!(files.len() >= 5, "{name}: only {} seeds", files.len());
        for path in files {
            let data = std::fs::read(&path).expect("read corpus file");
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(outcome.is_ok(), "{name}: {} panicked", path.display());
        }
    }
}

#[test]
fn the_valid_seed_token_verifies() {
    // Proves the token target reaches past the signature check into the claims.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/token");
    let set = pod_identity_agent::keys::KeySet::from_jwks(harness::JWKS.as_bytes()).unwrap();
    let keys = pod_identity_agent::keys::KeyStore::fixed(set, Default::default());
    let verifier = pod_identity_agent::token::Verifier::new(
        Some(keys),
        Some(harness::ISSUER.into()),
        vec![harness::AUDIENCE.into()],
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let token = std::fs::read_to_string(root.join("valid")).unwrap();
    let identity = rt.block_on(verifier.verify(&token)).unwrap();
    let claims = identity.verified.unwrap();
    assert_eq!(
        (claims.namespace.as_str(), claims.service_account.as_str()),
        ("team-a", "app")
    );
}
