#!/usr/bin/python3
"""A real SMTP server for dogslow's mail tests (aiosmtpd, Debian's
python3-aiosmtpd): it accepts mail on loopback and stores each message as
it arrived, plus what a mail reader would see, one JSON file per message:

  {"mail_from", "rcpt_tos", "received" (unix time), "auth_login",
   "raw_headers" (the header block, bytes as received), "headers" ([[name, value]] parsed),
   "subject", "text" (the text/plain body, decoded),
   "attachments" ([{"filename", "content_type", "content"}])}

  smtp_sink.py --port PORT --maildir DIR [--auth USER:PASSWORD]
               [--tls-cert PEM --tls-key PEM [--implicit-tls]]

Prints "ready PORT" on stdout once it listens; stops on SIGTERM/SIGINT.
"""
import argparse
import asyncio
import email
import email.policy
import json
import os
import signal
import ssl
import time
import warnings

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


class Store:
    def __init__(self, maildir):
        self.maildir = maildir
        self.count = 0

    async def handle_DATA(self, server, session, envelope):
        raw = envelope.original_content or envelope.content
        header_block = raw.split(b"\r\n\r\n", 1)[0]
        message = email.message_from_bytes(raw, policy=email.policy.default)
        text = None
        attachments = []
        for part in message.walk():
            if part.is_multipart():
                continue
            if part.get_content_disposition() == "attachment":
                content = part.get_content()
                if isinstance(content, bytes):
                    content = content.decode("utf-8", "replace")
                attachments.append({
                    "filename": part.get_filename(),
                    "content_type": part.get_content_type(),
                    "content": content,
                })
            elif part.get_content_type() == "text/plain" and text is None:
                text = part.get_content()
        login = session.auth_data if session.authenticated else None
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "received": time.time(),
            "auth_login": login.decode() if isinstance(login, bytes) else login,
            "raw_headers": header_block.decode("utf-8", "replace"),
            "headers": [[name, str(value)] for name, value in message.items()],
            "subject": str(message["Subject"]),
            "text": text,
            "attachments": attachments,
        }
        self.count += 1
        name = os.path.join(self.maildir, "%06d.json" % self.count)
        # Written whole, then renamed: a test never reads half a message.
        with open(name + ".tmp", "w") as out:
            json.dump(record, out)
        os.rename(name + ".tmp", name)
        return "250 Message accepted for delivery"


def authenticator_for(user, password):
    def authenticate(server, session, envelope, mechanism, auth_data):
        ok = (isinstance(auth_data, LoginPassword)
              and auth_data.login.decode() == user
              and auth_data.password.decode() == password)
        # handled=False: aiosmtpd answers the failure (535) itself.
        return AuthResult(success=ok, handled=False,
                          auth_data=auth_data.login if ok else None)
    return authenticate


async def main():
    # Plain AUTH on loopback is what the tests want; no warnings about it.
    warnings.simplefilter("ignore")
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--maildir", required=True)
    parser.add_argument("--auth")
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--implicit-tls", action="store_true")
    args = parser.parse_args()

    context = None
    if args.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.tls_cert, args.tls_key)
    options = {}
    if args.auth:
        user, password = args.auth.split(":", 1)
        options.update(auth_required=True, auth_require_tls=False,
                       authenticator=authenticator_for(user, password))
    if context and not args.implicit_tls:
        options.update(tls_context=context, require_starttls=True)
    store = Store(args.maildir)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(store, hostname="smtp-sink.test", **options),
        host=args.host, port=args.port, reuse_address=True,
        ssl=context if args.implicit_tls else None)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready %d" % server.sockets[0].getsockname()[1], flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()


if __name__ == "__main__":
    asyncio.run(main())
