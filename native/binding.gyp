{
  "targets": [
    {
      "target_name": "vmshift_native",
      "sources": ["vmshift_native.c"],
      "defines": ["NAPI_VERSION=8"],
      "cflags": ["-O2", "-Wall"]
    }
  ]
}
