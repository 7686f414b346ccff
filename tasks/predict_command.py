"""qatflow-predict's entry point: the serving wait policy (tasks/serving.py) before the command
loads torch, which reads it once. `python -m tasks.predict` sets it the same way."""

from tasks.serving import use_serving_wait_policy


def main() -> None:
    use_serving_wait_policy()
    from tasks.predict import main as predict

    predict()
