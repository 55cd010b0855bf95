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
fn the_valid_seed_token_passes_the_signature_and_meets_the_claims_checks() {
    // Proves the token target reaches past the signature check into the claims. The seed was
    // signed once, with a key whose private half is gone, for a lifetime from 2023 to 2100:
    // its signature verifies, and the claims checks then refuse that lifetime (at most 48 h),
    // which only a verified token ever gets to.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/token");
    let set =
        pod_identity_agent::identity::keys::KeySet::from_jwks(harness::JWKS.as_bytes()).unwrap();
    let keys = pod_identity_agent::identity::keys::KeyStore::fixed(set, Default::default());
    let verifier = pod_identity_agent::identity::token::Verifier::new(
        Some(keys),
        Some(harness::ISSUER.into()),
        vec![harness::AUDIENCE.into()],
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let token = std::fs::read_to_string(root.join("valid")).unwrap();
    match rt.block_on(verifier.verify(&token)) {
        Err(pod_identity_agent::identity::token::TokenError::Claims(why)) => {
            assert!(why.contains("lives longer"), "{why}")
        }
        other => panic!("expected the lifetime refusal, got {other:?}"),
    }
}
