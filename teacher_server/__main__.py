"""``python -m teacher_server --model timm:beitv2_base_patch16_224 --port 9000``

Starts (or joins) a local Ray cluster, deploys the teacher on Ray Serve with gRPC ingress, prints
the address students should use, and serves until Ctrl-C. ``--backend grpc`` serves the same
engine from a plain gRPC server without Ray.

Binds 127.0.0.1 unless ``--host`` says otherwise. A teacher reachable from a network requires the
shared token (``--auth-token-file`` or ``$KDSERVE_AUTH_TOKEN``): without one it refuses to start
unless ``--insecure`` says so, and Ray Serve's gRPC proxy is always reachable from the network (it
binds every interface whatever ``--host`` says). With ``--backend grpc`` it should also speak TLS
(``--tls-cert/--tls-key``); Ray Serve gets TLS from a proxy (k8s/).
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from kdserve import auth, tls
from kdserve.config import ConfigError, apply_overrides, build, load
from kdserve.errors import one_line
from kdserve.teacher_config import TeacherConfig


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m teacher_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML file of TeacherConfig fields (see kdserve/teacher_config.py)")
    p.add_argument("--model", help="timm:<name>, hf:<name or dir>, minilm or mpnet (default: minilm)")
    p.add_argument("--random-init", action="store_true", help="build the architecture with random weights")
    p.add_argument("--model-kwargs", help='JSON constructor/config overrides, e.g. \'{"depth": 4}\'')
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config field")
    p.add_argument("--port", type=int, default=9000, help="gRPC port (default 9000)")
    p.add_argument("--http-port", type=int, default=8000, help="Ray Serve HTTP port (default 8000)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1, this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--auth-token-file", default=None,
                   help=f"file holding the shared bearer token (default: ${auth.ENV_VAR}; neither: no auth)")
    p.add_argument("--insecure", action="store_true",
                   help="serve without a token where anyone who reaches the port could use the teacher "
                        "(always with Ray Serve, whose gRPC proxy binds every interface; --backend grpc "
                        "on a non-loopback --host)")
    p.add_argument("--allow-unauthenticated-describe", action="store_true",
                   help="let clients without the token call Describe (targets still need it)")
    p.add_argument("--tls-cert", default=None, help="PEM certificate (chain) for TLS (--backend grpc)")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--backend", choices=["serve", "grpc"], default="serve")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: start or join local)")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> TeacherConfig:
    cfg = load(TeacherConfig, args.config, args.set) if args.config else None
    data = cfg.model_dump() if cfg else apply_overrides({}, args.set)
    if args.model:
        data["model"] = args.model
    if args.random_init:
        data["pretrained"] = False
    if args.model_kwargs:
        try:
            data["model_kwargs"] = json.loads(args.model_kwargs)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--model-kwargs is not JSON: {e}") from None
    cfg = build(TeacherConfig, data, "teacher config")
    try:
        return cfg.check_frontend(args.backend)
    except ValueError as e:
        raise ConfigError(f"teacher config: {e}") from None


def check_port_free(host: str, port: int, flag: str) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            raise ConfigError(f"port {port} on {host} is in use; pick another with {flag}") from None


def is_loopback(host: str) -> bool:
    """True when ``host`` names only this machine (127.0.0.0/8, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        addrs = {a[4][0] for a in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def open_to_network(args: argparse.Namespace) -> str | None:
    """Why this teacher would be reachable from other machines, or None when only this one reaches it.

    Ray Serve's gRPC proxy binds every interface (``[::]``) whatever ``--host`` says, so a Serve
    teacher always is; the plain server only when ``--host`` is not a loopback address.
    """
    if args.backend == "serve":
        return "Ray Serve's gRPC proxy binds every interface whatever --host says"
    if not is_loopback(args.host):
        return f"--host {args.host} is reachable from other machines"
    return None


def security(args: argparse.Namespace) -> tuple[str | None, bool]:
    """(token or None, TLS on?) from the flags.

    A teacher other machines can reach without a token is refused (ConfigError) unless the operator
    said ``--insecure``: anyone who reaches its port would use its accelerators and read its
    targets. With ``--insecure`` it starts, with a warning.
    """
    try:
        token = auth.load_token(args.auth_token_file)
        use_tls = tls.check_pair(args.tls_cert, args.tls_key)
    except (auth.AuthError, tls.TLSError) as e:
        raise ConfigError(str(e)) from None
    if use_tls and args.backend != "grpc":
        raise ConfigError("--tls-cert/--tls-key need --backend grpc; put a TLS-terminating proxy in front "
                          "of Ray Serve instead (see k8s/)")
    if args.allow_unauthenticated_describe and not token:
        raise ConfigError("--allow-unauthenticated-describe needs a token (--auth-token-file or "
                          f"${auth.ENV_VAR}): without one every method is open anyway")
    exposed = None if token else open_to_network(args)
    if exposed and not args.insecure:
        raise ConfigError(f"refusing to serve without a token: {exposed}, so anyone who can reach port {args.port} "
                          f"could use the teacher; pass --auth-token-file FILE or set ${auth.ENV_VAR} "
                          "(students send the same token), or --insecure to serve it open anyway")
    if exposed:
        print(f"warning: serving without authentication (--insecure): {exposed}; anyone who can reach port "
              f"{args.port} can use the teacher", file=sys.stderr, flush=True)
    return token, use_tls


def _wait_for_ctrl_c() -> None:
    """Until SIGINT (Ctrl-C) or SIGTERM. Both are caught here: a process started in the background
    of a shell (or by one that was) inherits SIGINT ignored, and Python then never raises
    KeyboardInterrupt, so the documented Ctrl-C would not stop it."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


def serve_forever(cfg: TeacherConfig, args: argparse.Namespace) -> None:
    token, use_tls = security(args)
    check_port_free(args.host, args.port, "--port")
    if args.backend == "grpc":
        from teacher_server import malloc
        from teacher_server.engine import TeacherEngine
        from teacher_server.grpc_server import run_server

        creds = tls.server_credentials(args.tls_cert, args.tls_key) if use_tls else None
        malloc.tune()  # this process is the teacher's: reply-sized buffers stay in the heap
        engine = TeacherEngine.from_config(cfg)
        with run_server(engine, port=args.port, host=args.host, auth_token=token, tls=creds,
                        allow_unauthenticated_describe=args.allow_unauthenticated_describe) as port:
            host = socket.gethostname() if not is_loopback(args.host) else args.host
            scheme = "grpcs" if use_tls else "grpc"
            print(f"kdserve teacher {engine.model_name} (fingerprint {engine.fingerprint}) "
                  f"on {scheme}://{host}:{port} [plain gRPC, auth {'token' if token else 'none'}]; Ctrl-C to stop",
                  flush=True)
            _wait_for_ctrl_c()
        return
    if args.allow_unauthenticated_describe:
        raise ConfigError("--allow-unauthenticated-describe is for --backend grpc; Ray Serve checks every call")
    replica_token = None
    if token and args.auth_token_file:  # the replicas read the same file (same machine, or a mounted Secret)
        cfg = cfg.updated("serve", auth_token_file=str(Path(args.auth_token_file).resolve()))
    elif token:  # from $KDSERVE_AUTH_TOKEN: the replicas get the variable in their runtime_env (which Ray
        replica_token = token  # logs in runtime_env_agent.log on the node: --auth-token-file keeps it out)

    if cfg.serve.direct_host == "127.0.0.1":  # the default: the replicas' own endpoints on --host too
        cfg = cfg.updated("serve", direct_host=args.host)

    import ray
    from ray import serve

    from teacher_server.serve_app import deploy

    check_port_free(args.host, args.http_port, "--http-port")
    ray.init(address=args.ray_address, log_to_driver=False)
    try:
        deploy(cfg, grpc_port=args.port, http_port=args.http_port, host=args.host, auth_token=replica_token)
        print(f"kdserve teacher {cfg.model} on grpc://{socket.gethostname()}:{args.port} "
              f"(Ray Serve; metrics on Ray's Prometheus endpoint); Ctrl-C to stop", flush=True)
        _wait_for_ctrl_c()
    finally:
        print("shutting down the teacher...", flush=True)
        serve.shutdown()
        ray.shutdown()


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
        from teacher_server.validate import build_architecture

        build_architecture(cfg, "teacher")  # a typo costs seconds, not a cluster start
        serve_forever(cfg, args)
    except (ConfigError, ValueError, OSError) as e:  # tls.TLSError and auth.AuthError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # e.g. Serve could not start the replica (weights not reachable...)
        print(f"error: the teacher did not start: {one_line(e)} (the Ray Serve replica log has the details)",
              file=sys.stderr)
        return 1
    return 0


def cli() -> None:
    """Console entry point ``kdserve-teacher``."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
