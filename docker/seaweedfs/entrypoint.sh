#!/bin/sh
# Starts single-node SeaweedFS (master + volume + filer + S3 gateway) whose S3 API accepts one
# identity: the key pair from the environment. The identity file is written at start-up into
# the container's tmpfs, so the secret lives in .env only, never in the repository or an image.
# Then it hands over to the image's own entrypoint, which sets the data defaults, fixes the
# ownership of /data and drops root for the `seaweed` user.
#
# Environment: S3_ACCESS_KEY, S3_SECRET_KEY (letters, digits and ._/+=- only);
# SEAWEEDFS_IMAGE_ENTRYPOINT only for tests (default: the image's /entrypoint.sh).
set -eu

: "${S3_ACCESS_KEY:?set S3_ACCESS_KEY (see .env.example)}"
: "${S3_SECRET_KEY:?set S3_SECRET_KEY (see .env.example)}"

# The keys go into JSON unescaped: refuse anything that could break out of the string.
for key in "$S3_ACCESS_KEY" "$S3_SECRET_KEY"; do
    case "$key" in
        *[!A-Za-z0-9._/+=-]*)
            echo "S3_ACCESS_KEY and S3_SECRET_KEY may hold only letters, digits and ._/+=-;" \
                 "generate one with: openssl rand -hex 24" >&2
            exit 64
            ;;
    esac
done

umask 077
config="${TMPDIR:-/tmp}/s3-identities.json"
cat > "$config" <<JSON
{
  "identities": [
    {
      "name": "layermoe",
      "credentials": [{"accessKey": "$S3_ACCESS_KEY", "secretKey": "$S3_SECRET_KEY"}],
      "actions": ["Admin", "Read", "List", "Tagging", "Write"]
    }
  ]
}
JSON
# Readable by the unprivileged user the image's entrypoint switches to, and by no one else.
chown seaweed "$config" 2>/dev/null || true

exec "${SEAWEEDFS_IMAGE_ENTRYPOINT:-/entrypoint.sh}" server -ip.bind=0.0.0.0 \
    -s3 -s3.port=8333 -s3.config="$config" "$@"
