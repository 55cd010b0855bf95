"""Fetch credentials from the container credentials endpoint with botocore.

Uses botocore's default credential chain, configured only through the
environment the way EKS configures a pod:
  AWS_CONTAINER_CREDENTIALS_FULL_URI, AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE
Prints one JSON object on stdout: {access_key, secret_key, token, account_id,
method}. Exits non-zero with the error on stderr when no credentials resolve.
"""

import json
import sys

import botocore.session


def main() -> int:
    session = botocore.session.get_session()
    try:
        credentials = session.get_credentials()
    except Exception as err:  # report any SDK failure to the harness verbatim
        print(f"botocore failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    if credentials is None:
        print("botocore found no credentials", file=sys.stderr)
        return 1
    frozen = credentials.get_frozen_credentials()
    print(
        json.dumps(
            {
                "access_key": frozen.access_key,
                "secret_key": frozen.secret_key,
                "token": frozen.token,
                "account_id": getattr(frozen, "account_id", None),
                "method": credentials.method,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
