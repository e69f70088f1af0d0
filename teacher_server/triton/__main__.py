"""``python -m teacher_server.triton --model ... --out ./model_repository [--serve]``: see repository.py."""
from teacher_server.triton.repository import main

if __name__ == "__main__":
    raise SystemExit(main())
