//! Fetches credentials from the container credentials endpoint with the AWS
//! SDK for Rust (`aws_config::ecs::EcsCredentialsProvider`), configured only
//! through the environment the way EKS configures a pod:
//! `AWS_CONTAINER_CREDENTIALS_FULL_URI`, `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`.
//!
//! Prints one JSON object on stdout: `{access_key, secret_key, token,
//! account_id}`. Exits 1 with the provider's error chain on stderr on failure.

use std::error::Error;
use std::process::ExitCode;

use aws_config::ecs::EcsCredentialsProvider;
use aws_credential_types::provider::ProvideCredentials;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let provider = EcsCredentialsProvider::builder().build();
    match provider.provide_credentials().await {
        Ok(creds) => {
            let out = serde_json::json!({
                "access_key": creds.access_key_id(),
                "secret_key": creds.secret_access_key(),
                "token": creds.session_token(),
                "account_id": creds.account_id().map(|a| a.as_str()),
            });
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            let mut message = err.to_string();
            let mut source = err.source();
            while let Some(cause) = source {
                message.push_str(": ");
                message.push_str(&cause.to_string());
                source = cause.source();
            }
            eprintln!("EcsCredentialsProvider failed: {message}");
            ExitCode::FAILURE
        }
    }
}
