"""Example events for test deliveries: a realistic payload per entity, from the seeds. Pure.

A test delivery should look like what the receiver will get in production, so its parser
and signature check are exercised for real; the shapes here are shortened from the seed
products' documented examples (tillhub's event reference, tilby's entities, the store's
orders). An entity without one gets a small generic object.
"""

from __future__ import annotations

import re
from typing import Any

from .models import EVENT_NAME_RE

# Shortened from the seeds: keys and value types as documented, fewer of them.
EXAMPLES: dict[str, dict[str, Any]] = {
    "transaction": {
        "id": "10b06f38-031d-4e0c-8706-0474c8c5b61c",
        "register_id": "reg_12345",
        "branch_id": "branch_67890",
        "status": "completed",
        "total_amount": 150.75,
        "tax_amount": 19.25,
        "currency": "EUR",
        "payment_method": "card",
        "created_at": "2022-12-13T08:45:00.881Z",
        "items": [{"product_id": "product_789", "sku": "ITEM-001", "quantity": 2}],
    },
    "customers": {
        "id": "customer_def456",
        "customer_number": "CUST-2022-001234",
        "email": "john.doe@example.com",
        "first_name": "John",
        "last_name": "Doe",
        "addresses": [
            {"type": "billing", "street": "Hauptstraße 123", "city": "Berlin", "country": "DE"}
        ],
    },
    "products": {
        "id": "product_789",
        "sku": "COFFEE-PREMIUM-001",
        "name": "Premium Arabica Coffee Beans",
        "category": "Beverages",
        "barcode": "1234567890123",
        "prices": [{"type": "retail", "amount": 65.5, "currency": "EUR", "tax_rate": 0.19}],
    },
    "stocks-book": {
        "id": "stock_movement_123",
        "product_id": "product_789",
        "branch_id": "branch_67890",
        "quantity": -2,
        "reason": "sale",
    },
    "balances": {
        "id": "balance_456",
        "register_id": "reg_12345",
        "amount": 1250.4,
        "currency": "EUR",
    },
    # Tilby: the entity model itself.
    "sales": {
        "id": 1842,
        "uuid": "0f8fad5b-d9cb-469f-a165-70867728950e",
        "name": "Sale 1842",
        "final_amount": 23.4,
        "currency": "EUR",
        "sale_items": [{"name": "Espresso", "quantity": 2, "price": 1.8}],
    },
    "items": {"id": 314, "name": "Espresso", "category_id": 3, "price1": 1.8},
    # The store: its order JSON.
    "orders": {
        "id": "order_1001",
        "number": 1001,
        "email": "jane@example.com",
        "total": "42.00",
        "currency": "EUR",
        "line_items": [{"title": "T-shirt", "quantity": 1, "price": "42.00"}],
    },
}

_NAME = re.compile(EVENT_NAME_RE)


def event_name_for(patterns: list[str]) -> str:
    """A concrete event name a subscription's patterns match: the first exact name, else the
    first pattern made concrete (`products.*` -> `products.create.v0`, `*` -> products)."""
    for pattern in patterns:
        if _NAME.match(pattern):
            return pattern
    first = patterns[0] if patterns else "*"
    parts = first.split(".")
    entity = "products" if parts[0] == "*" else parts[0]
    action = parts[1] if len(parts) > 1 and parts[1] != "*" else "create"
    return f"{entity}.{action}.v0"


def example(event_name: str) -> tuple[dict[str, Any], str]:
    """The example payload of the event's entity and the entity instance id it is about."""
    entity = event_name.split(".")[0]
    payload = EXAMPLES.get(entity) or {"id": f"{entity}_example_1", "example": True}
    return payload, str(payload["id"])
