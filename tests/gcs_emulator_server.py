"""gcp-storage-emulator's server with the object generation headers that real Cloud Storage sends on a download.

TensorStore (orbax's array writer) reads `x-goog-generation` from a download to make its next conditional write
of an OCDBT manifest; the emulator (2026.7.19) omits the header, and the second write of a manifest fails with
"Malformed StorageGeneration". This adds the headers (the values the emulator already keeps) and starts the
emulator's own command line: `python tests/gcs_emulator_server.py start --port=...`.
"""

import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:  # noqa: BLE001  the emulator's own handler answers a missing object
    obj = None
  if obj is not None:
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", 1))
  return _download(request, response, storage, *args, **kwargs)


objects.download = download  # before the server module reads its route table

from gcp_storage_emulator.__main__ import main  # noqa: E402

if __name__ == "__main__":
  sys.exit(main())
