// Fetches credentials from the container credentials endpoint with the AWS SDK
// for JavaScript v3 (`fromHttp`), configured only through the environment the
// way EKS configures a pod:
//   AWS_CONTAINER_CREDENTIALS_FULL_URI, AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE
// Prints one JSON object on stdout: {access_key, secret_key, token, account_id}.
// Exits non-zero with the SDK's error on stderr when the provider fails.
import { fromHttp } from "@aws-sdk/credential-provider-http";

try {
  const provider = fromHttp({});
  const creds = await provider();
  process.stdout.write(
    JSON.stringify({
      access_key: creds.accessKeyId,
      secret_key: creds.secretAccessKey,
      token: creds.sessionToken ?? null,
      account_id: creds.accountId ?? null,
      expiration: creds.expiration ? creds.expiration.toISOString() : null,
    }) + "\n",
  );
} catch (err) {
  process.stderr.write(`fromHttp failed: ${err && err.stack ? err.stack : err}\n`);
  process.exit(1);
}
