from __future__ import annotations

from decimal import Decimal

import pytest

from farebox.errors import ConfigError
from farebox.money import BASE_SEPOLIA_USDC, BASE_USDC, DEVCHAIN_USDC
from farebox.server.routes import RequestInfo, RouteTable

PAY_TO = "0x" + "22" * 20


def request(method: str = "GET", path: str = "/", query: str = "") -> RequestInfo:
    return RequestInfo(method, path, f"https://api.test{path}{query}", {})


def test_match_by_method_and_pattern() -> None:
    table = RouteTable()
    table.add("GET", "/reports/{id}", "$0.25", assets=BASE_USDC, pay_to=PAY_TO)
    table.add("*", "/files/{rest:path}", "$0.01", assets=BASE_USDC, pay_to=PAY_TO)
    found = table.match("GET", "/reports/42")
    assert found is not None
    assert found.params == {"id": "42"}
    assert table.match("HEAD", "/reports/42") is not None  # HEAD is answered like GET
    assert table.match("POST", "/reports/42") is None
    assert table.match("GET", "/reports/42/extra") is None
    assert table.match("GET", "/reportsX42") is None
    found = table.match("DELETE", "/files/a/b/c.txt")
    assert found is not None
    assert found.params == {"rest": "a/b/c.txt"}
    assert table.match("GET", "/free") is None


def test_one_price_offered_in_every_asset_exactly() -> None:
    table = RouteTable()
    route = table.add("GET", "/x", "$0.01", assets=[BASE_USDC, BASE_SEPOLIA_USDC], pay_to=PAY_TO)
    offers = route.offers(request(path="/x"))
    assert [(o.network, o.amount) for o in offers] == [
        ("eip155:8453", 10_000),
        ("eip155:84532", 10_000),
    ]
    assert offers[1].extra == {"name": "USDC", "version": "2"}
    assert route.name == "GET /x"


def test_price_may_depend_on_the_request() -> None:
    table = RouteTable()

    def price(req: RequestInfo) -> Decimal:
        return Decimal("0.02") if "big=1" in req.url else Decimal("0.01")

    route = table.add("GET", "/q", price, assets=BASE_USDC, pay_to=PAY_TO)
    assert route.offers(request(path="/q", query="?big=1"))[0].amount == 20_000
    assert route.offers(request(path="/q"))[0].amount == 10_000


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "FETCH"},
        {"path": "no-slash"},
        {"price": 0.01},
        {"price": "$0.0000001"},
        {"pay_to": "0x1234"},
        {"assets": []},
        {"max_timeout_seconds": 0},
    ],
)
def test_bad_routes_fail_at_start_up(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {
        "method": "GET",
        "path": "/x",
        "price": "$0.01",
        "assets": BASE_USDC,
        "pay_to": PAY_TO,
    } | kwargs
    with pytest.raises(ConfigError):
        RouteTable().add(
            args.pop("method"),  # type: ignore[arg-type]
            args.pop("path"),  # type: ignore[arg-type]
            args.pop("price"),  # type: ignore[arg-type]
            **args,  # type: ignore[arg-type]
        )


def test_other_spellings_servers_serve_as_the_route_are_priced() -> None:
    table = RouteTable()
    table.add("GET", "/weather", 1, assets=DEVCHAIN_USDC, pay_to="0x" + "5b" * 20)
    table.add("GET", "/reports/{id}", 2, assets=DEVCHAIN_USDC, pay_to="0x" + "5b" * 20)
    for spelling in ("/WEATHER", "/Weather/", "/weather;jsessionid=1", "/WEATHER;a=b/"):
        found = table.match("GET", spelling)
        assert found is not None, spelling
        assert found.route.path == "/weather"
    # Parameters keep their case and, when the route takes them so, their ";" parts.
    report = table.match("GET", "/REPORTS/Ab;c")
    assert report is not None
    assert report.params == {"id": "Ab;c"}
    assert table.match("GET", "/weatherx") is None
    assert table.match("GET", "/other;weather") is None
    assert table.methods_at("/WEATHER;x") == frozenset({"GET"})
