"""An SMTP relay built on aiosmtpd, for tests/interop.rs: a server the project did not write.

Listens on 127.0.0.1, optionally with TLS (STARTTLS required, or implicit TLS from the first
byte) and required AUTH (PLAIN and LOGIN, from aiosmtpd itself). Every accepted message is
appended, as one JSON line, to --jsonl before the relay answers 250 to it. Every AUTH attempt
is appended too, as {"event": "auth", ...} (the password is never written).

Prints `READY <port>` on stdout once it listens (with --port 0 the system picks the port), and
exits with status 0 on SIGTERM or SIGINT.

    python aiosmtpd_relay.py --port 0 --tls starttls --cert cert.pem --key key.pem \
        --user relayuser --password secret --jsonl out.jsonl
"""

import argparse
import asyncio
import json
import logging
import signal
import ssl
import sys
import warnings
import weakref

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument(
        "--tls",
        choices=["none", "starttls", "implicit"],
        default="none",
        help="none: plain and no STARTTLS offered; starttls: STARTTLS offered and required "
        "before MAIL; implicit: TLS from the first byte (port 465 style)",
    )
    p.add_argument("--cert", help="PEM certificate (chain) of the relay")
    p.add_argument("--key", help="PEM private key of the relay")
    p.add_argument("--user", help="AUTH is required, and only this user is accepted")
    p.add_argument("--password", help="the password of --user")
    p.add_argument("--jsonl", required=True, help="file to append one JSON line per event to")
    p.add_argument(
        "--size-limit",
        type=int,
        default=33554432,
        help="the SIZE advertised in EHLO and enforced (aiosmtpd's data_size_limit)",
    )
    args = p.parse_args()
    if args.tls != "none" and not (args.cert and args.key):
        p.error("--tls starttls/implicit needs --cert and --key")
    if bool(args.user) != bool(args.password):
        p.error("--user and --password go together")
    return args


class Recorder:
    """The aiosmtpd handler and authenticator: checks credentials, records what happened."""

    def __init__(self, path, user, password):
        self.out = open(path, "a", encoding="utf-8")
        self.user = user.encode() if user else None
        self.password = password.encode() if password else None

    def write(self, record):
        self.out.write(json.dumps(record, sort_keys=True) + "\n")
        self.out.flush()

    # aiosmtpd calls this for the built-in AUTH PLAIN and AUTH LOGIN.
    def authenticate(self, server, session, envelope, mechanism, auth_data):
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == self.user
            and auth_data.password == self.password
        )
        login = auth_data.login.decode("utf-8", "replace") if auth_data else None
        session.auth_mechanism = mechanism if ok else None
        self.write(
            {
                "event": "auth",
                "mechanism": mechanism,
                "user": login,
                "success": ok,
                "tls": tls_info(server) is not None,
            }
        )
        if ok:
            return AuthResult(success=True, auth_data=auth_data)
        return AuthResult(success=False, handled=False)

    # Counts the EHLOs of a connection (on the SMTP object: aiosmtpd makes a new session after
    # STARTTLS): one before STARTTLS and one after it is the RFC 3207 minimum.
    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        server.ehlo_count = getattr(server, "ehlo_count", 0) + 1
        session.host_name = hostname
        return responses

    async def handle_DATA(self, server, session, envelope):
        tls = tls_info(server)
        login = getattr(session.auth_data, "login", None)
        self.write(
            {
                "event": "message",
                "mail_from": envelope.mail_from,
                "rcpt_tos": list(envelope.rcpt_tos),
                "data": envelope.content.decode("utf-8", "replace"),
                "ehlo": session.host_name,
                "ehlo_count": getattr(server, "ehlo_count", 0),
                "mail_options": list(envelope.mail_options),
                "tls": tls is not None,
                "tls_version": tls,
                "authenticated": bool(session.authenticated),
                "auth_user": login.decode("utf-8", "replace") if login else None,
                "auth_mechanism": getattr(session, "auth_mechanism", None),
            }
        )
        return "250 2.0.0 OK: recorded by aiosmtpd"


def tls_info(server):
    """The TLS version of the session, or None if it is not encrypted.

    aiosmtpd sets session.ssl only after STARTTLS; the transport knows in both cases.
    """
    transport = server.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport else None
    return ssl_object.version() if ssl_object is not None else None


def server_tls_context(cert, key):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def main():
    args = parse_args()
    logging.basicConfig(
        stream=sys.stderr, level=logging.WARNING, format="aiosmtpd_relay: %(message)s"
    )
    # Over implicit TLS the session is encrypted although aiosmtpd does not know it.
    warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")
    recorder = Recorder(args.jsonl, args.user, args.password)
    context = server_tls_context(args.cert, args.key) if args.tls != "none" else None
    auth = args.user is not None

    sessions = weakref.WeakSet()

    def factory():
        smtp = SMTP(
            recorder,
            # A fixed name: the default asks the resolver for this host's FQDN.
            hostname="relay.interop.test",
            ident="aiosmtpd interop relay",
            tls_context=context if args.tls == "starttls" else None,
            require_starttls=args.tls == "starttls",
            authenticator=recorder.authenticate if auth else None,
            auth_required=auth,
            # Over implicit TLS aiosmtpd does not know the session is encrypted: it only
            # counts STARTTLS. Offering AUTH there needs this off; the relay is TLS anyway.
            auth_require_tls=args.tls == "starttls",
            data_size_limit=args.size_limit,
        )
        sessions.add(smtp)
        return smtp

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        factory,
        host=args.host,
        port=args.port,
        ssl=context if args.tls == "implicit" else None,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    port = server.sockets[0].getsockname()[1]
    print(f"READY {port}", flush=True)
    await stop.wait()
    server.close()
    # Python 3.12 and later wait in wait_closed() for open sessions: close them first.
    for smtp in list(sessions):
        if smtp.transport is not None:
            smtp.transport.close()
    try:
        await asyncio.wait_for(server.wait_closed(), 5)
    except asyncio.TimeoutError:
        pass
    recorder.out.close()


if __name__ == "__main__":
    asyncio.run(main())
