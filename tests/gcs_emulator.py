"""`python tests/gcs_emulator.py start --port=N ...`: gcp-storage-emulator, plus the headers
real Cloud Storage sends with an object's bytes (x-goog-generation, x-goog-metageneration).
tensorstore reads them to update an object conditionally (OCDBT manifests in orbax
checkpoints); without them every second write of a manifest fails ("Malformed
StorageGeneration")."""

import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # not found: the response already says so
        return
    response["x-goog-generation"] = obj["generation"]
    response["x-goog-metageneration"] = obj["metageneration"]


objects.download = download  # before the server module builds its routing table

from gcp_storage_emulator.__main__ import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
