"""The agent for ``requests``: a session that pays 402 challenges with the same flow as httpx.

``session = PaymentSession(agent)``; ``session.get(url)`` pays when asked to and returns the paid
response, whose :class:`~farebox.agent.agent.Payment` is in ``response.farebox_payment``. A paid
retry that fails to connect or times out is handed back to the flow, which sends the same signed
payment and idempotency id again (``Agent.resends`` times) before the error is raised. A card
payment's token is minted with the card wallet's blocking
:meth:`~farebox.agent.card.CardWallet.mint`.
"""

from __future__ import annotations

from typing import Any

try:
    import requests
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the requests adapter needs: pip install 'farebox[requests]'") from exc

from farebox.agent.agent import Agent, Answer, Fetch, MintToken, Payment, Retry

__all__ = ["PaymentSession"]

MAX_402_BODY = 64 * 1024


def _answer(response: requests.Response, max_body: int) -> Answer:
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(8192):
        chunks.append(chunk)
        size += len(chunk)
        if size > max_body:
            chunks = []
            break
    response.close()
    headers = {k.lower(): v for k, v in response.headers.items()}
    return Answer(response.status_code, headers, b"".join(chunks))


class PaymentSession(requests.Session):
    """A ``requests.Session`` whose requests pay for themselves within the agent's limits."""

    def __init__(self, agent: Agent, *, max_body: int = MAX_402_BODY) -> None:
        super().__init__()
        self.agent = agent
        self.max_body = max_body

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        stream = kwargs.pop("stream", False)
        response = super().send(request, stream=True, **kwargs)
        authorization = str(request.headers.get("authorization", ""))
        if (
            response.status_code != 402
            or "payment-signature" in request.headers
            or authorization[:8].lower() == "payment "
        ):
            return self._finish(response, stream)
        flow = self.agent.pay(
            str(request.method), str(request.url), _answer(response, self.max_body)
        )
        payment: Payment | None = None
        try:
            step = next(flow)
            while True:
                if isinstance(step, MintToken):
                    try:
                        spt = step.wallet.mint(step.request)
                    except Exception as exc:  # the flow releases the reservation and raises
                        step = flow.throw(exc)
                        continue
                    step = flow.send(spt)
                    continue
                if isinstance(step, Retry):
                    retry = request.copy()
                    retry.headers.update(step.headers)
                    try:
                        response = super().send(retry, stream=True, **kwargs)
                    except (requests.ConnectionError, requests.Timeout) as exc:
                        step = flow.throw(exc)  # the same step again, or the error raised
                        continue
                    answer = Answer(
                        response.status_code,
                        {k.lower(): v for k, v in response.headers.items()},
                        b"",
                    )
                    if response.status_code == 402 or "payment-required" in response.headers:
                        answer = _answer(response, self.max_body)
                else:
                    assert isinstance(step, Fetch)
                    fetch = requests.Request(
                        "GET", step.url, headers={"accept": "application/json"}
                    )
                    answer = _answer(
                        super().send(self.prepare_request(fetch), stream=True, **kwargs),
                        self.max_body,
                    )
                step = flow.send(answer)
        except StopIteration as done:
            payment = done.value
        response.farebox_payment = payment  # type: ignore[attr-defined]
        return self._finish(response, stream)

    @staticmethod
    def _finish(response: requests.Response, stream: bool) -> requests.Response:
        if not stream:
            _ = response.content  # what requests does itself when not streaming
        return response
