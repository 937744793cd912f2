"""Verifies every DKIM-Signature of a message with dkimpy, an implementation this project did
not write. The key records come from the command line instead of DNS.

    python verify.py MESSAGE_FILE RECORDS_JSON

RECORDS_JSON maps a record's name (`sel._domainkey.example.com`, no final dot) to its TXT value.
Prints one JSON object per signature, in header order: {"d", "s", "a", "ok", "reason"}.
"""

import json
import sys

import dkim


def main():
    message = open(sys.argv[1], "rb").read()
    records = json.loads(sys.argv[2])

    def dnsfunc(name, timeout=5):
        name = name.decode() if isinstance(name, bytes) else name
        value = records.get(name.rstrip("."))
        return value.encode() if value is not None else None

    headers, _ = dkim.rfc822_parse(message)
    count = sum(1 for name, _ in headers if name.lower() == b"dkim-signature")
    results = []
    for index in range(count):
        verifier = dkim.DKIM(message)
        reason = ""
        try:
            ok = verifier.verify(idx=index, dnsfunc=dnsfunc)
        except dkim.DKIMException as e:
            ok, reason = False, str(e)
        fields = verifier.signature_fields or {}
        results.append(
            {
                "d": fields.get(b"d", b"").decode(),
                "s": fields.get(b"s", b"").decode(),
                "a": fields.get(b"a", b"").decode(),
                "ok": bool(ok),
                "reason": reason,
            }
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
