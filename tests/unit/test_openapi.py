"""The OpenAPI document: valid OpenAPI 3.1 (openapi-spec-validator), one operation per
route, and its partition schema the very one system files are checked against."""

from __future__ import annotations

import jsonschema
from openapi_spec_validator import validate

from corevisor.api.openapi import REF, document
from corevisor.api.routes import ROUTES
from corevisor.config.schema import components


def test_the_document_validates_as_openapi_3() -> None:
    doc = document()
    validate(doc)
    assert doc["openapi"].startswith("3.1")


def test_every_route_is_an_operation_with_its_errors() -> None:
    paths = document()["paths"]
    for route in ROUTES:
        op = paths[route.pattern][route.method.lower()]
        assert op["operationId"] == route.operation
        assert "500" in op["responses"]
        if "{name}" in route.pattern:
            assert op["responses"]["404"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/Error"}
    ids = [r.operation for r in ROUTES]
    assert len(ids) == len(set(ids))


def test_bodies_use_the_system_file_schema() -> None:
    schemas = document()["components"]["schemas"]
    assert schemas["PartitionSpec"] == components(REF)["PartitionSpec"]
    create = schemas["PartitionCreate"]
    assert create["properties"]["partitions"]["additionalProperties"] == {
        "$ref": "#/components/schemas/PartitionSpec"}
    # A body the schema accepts, and one it refuses, checked with a JSON Schema validator.
    registry_doc = {"$defs": {k: _local(v) for k, v in schemas.items()}, **_local(create)}
    good = {"partitions": {"hello": {"image": "/x/hello.elf", "memory": "16M", "pin": [0]}}}
    jsonschema.validate(good, registry_doc)
    bad = {"partitions": {"hello": {"image": "/x", "memroy": "16M"}}}
    try:
        jsonschema.validate(bad, registry_doc)
    except jsonschema.ValidationError as e:
        assert "memroy" in e.message
    else:
        raise AssertionError("a misspelt key passed the schema")


def _local(schema: object) -> object:
    """Refs to components rewritten as refs into $defs (a standalone JSON schema)."""
    if isinstance(schema, dict):
        return {k: (v.replace("#/components/schemas/", "#/$defs/") if k == "$ref" else _local(v))
                for k, v in schema.items()}
    if isinstance(schema, list):
        return [_local(v) for v in schema]
    return schema
