"""A real SMTP server for the notification tests (aiosmtpd): every message it accepts is
appended, decoded, as one JSON line to OUT.
Usage: smtp_sink.py PORT OUT [plain | starttls CERT KEY | tls CERT KEY]
(starttls: the server offers and requires STARTTLS; tls: TLS from the first byte, as smtps)."""
import asyncio
import email
import json
import signal
import ssl
import sys
from email import policy

from aiosmtpd.controller import Controller

PORT, OUT = int(sys.argv[1]), sys.argv[2]


class Sink:
    async def handle_DATA(self, server, session, envelope):
        raw = envelope.original_content or envelope.content
        msg = email.message_from_bytes(raw, policy=policy.default)
        head = raw.split(b"\r\n\r\n", 1)[0]
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "from": str(msg["from"]),
            "to": str(msg["to"]),
            "subject": str(msg["subject"]),
            "raw_subject": next(
                (l.decode("ascii", "replace") for l in head.split(b"\r\n") if l.lower().startswith(b"subject:")),
                "",
            ),
            "message_id": str(msg["message-id"]),
            "content_type": msg.get_content_type(),
            "charset": msg.get_content_charset(),
            "transfer_encoding": str(msg["content-transfer-encoding"]),
            "raw_is_ascii": all(b < 128 for b in raw),
            "body": msg.get_content(),
        }
        with open(OUT, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        return "250 Message accepted"


MODE = sys.argv[3] if len(sys.argv) > 3 else "plain"
kwargs = {}
if MODE in ("starttls", "tls"):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(sys.argv[4], sys.argv[5])
    if MODE == "starttls":
        kwargs = {"tls_context": context, "require_starttls": True}
    else:
        kwargs = {"ssl_context": context}
controller = Controller(Sink(), hostname="127.0.0.1", port=PORT, **kwargs)
controller.start()
print("ready", flush=True)
signal.sigwait([signal.SIGTERM, signal.SIGINT])
controller.stop()
