"""Evaluate a ValidatingAdmissionPolicy against admission requests, with cel-python.

Reads one JSON object on stdin:
  {"policy": <ValidatingAdmissionPolicy>, "binding": <its binding>,
   "cases": [{"name", "request", "object", "oldObject"}, ...]}
and prints a JSON list with, for each case in order:
  {"name", "matched": bool, "allowed": bool,
   "denials": [{"check": "matchConditions[0]" | "validations[2]" | "variables.x",
                "message", "error": <evaluation error, if one>}]}

It follows kube-apiserver's admission of a policy: the binding must name the policy and deny;
matchConstraints.resourceRules select the request by operation and group/version/resource;
every matchCondition must be true for the policy to apply (an error is a denial, as under
failurePolicy Fail); each variable is bound as `variables.<name>`; every validation must be
true. Where cel-python's dialect and Kubernetes' differ, the policy must be written in what
both evaluate alike (standard CEL): an expression that does not compile here fails the run.
Exits 2 on a policy this evaluator does not model (selectors, param kinds, audit-only
bindings), rather than evaluating less than Kubernetes would.
"""

import json
import sys

import celpy
from celpy import celtypes


def fail(message):
    print(f"admission_policy.py: {message}", file=sys.stderr)
    sys.exit(2)


ENV = celpy.Environment()


def compile_expression(where, expression):
    try:
        return ENV.program(ENV.compile(expression))
    except Exception as err:  # a parse or compile error names the expression
        fail(f"{where}: does not compile in cel-python: {err}\n  {expression}")


def evaluate(program, activation):
    """(value, error): an evaluation error is a value in CEL, and cel-python may also raise."""
    try:
        result = program.evaluate(activation)
    except Exception as err:  # celpy raises CELEvalError (and others) for runtime errors
        return None, f"{type(err).__name__}: {err}"
    if isinstance(result, celpy.CELEvalError):
        return None, str(result)
    return result, None


def rule_matches(rule, request):
    """One resourceRule against the request's operation and resource."""
    resource = request["resource"]

    def allows(values, value):
        return "*" in values or value in values

    return (
        allows(rule.get("operations", []), request["operation"])
        and allows(rule.get("apiGroups", []), resource["group"])
        and allows(rule.get("apiVersions", []), resource["version"])
        and allows(rule.get("resources", []), resource["resource"])
    )


def check_supported(policy, binding):
    spec, binding_spec = policy["spec"], binding["spec"]
    constraints = spec.get("matchConstraints", {})
    for field in ("excludeResourceRules", "namespaceSelector", "objectSelector"):
        if constraints.get(field):
            fail(f"matchConstraints.{field} is not modelled")
    for field in ("paramKind", "auditAnnotations"):
        if spec.get(field):
            fail(f"spec.{field} is not modelled")
    for field in ("paramRef", "matchResources"):
        if binding_spec.get(field):
            fail(f"the binding's {field} is not modelled")
    if binding_spec.get("policyName") != policy["metadata"]["name"]:
        fail(f"the binding names policy {binding_spec.get('policyName')!r}, "
             f"not {policy['metadata']['name']!r}")
    if "Deny" not in binding_spec.get("validationActions", []):
        fail("the binding does not deny (validationActions lacks Deny)")
    if spec.get("failurePolicy", "Fail") != "Fail":
        fail("only failurePolicy Fail is modelled")


def run(policy, binding, cases):
    check_supported(policy, binding)
    spec = policy["spec"]
    rules = spec.get("matchConstraints", {}).get("resourceRules", [])
    conditions = [
        (f"matchConditions[{i}]", compile_expression(f"matchConditions[{i}]", c["expression"]))
        for i, c in enumerate(spec.get("matchConditions", []))
    ]
    variables = [
        (v["name"], compile_expression(f"variables.{v['name']}", v["expression"]))
        for v in spec.get("variables", [])
    ]
    validations = [
        (f"validations[{i}]", v.get("message", v["expression"]),
         compile_expression(f"validations[{i}]", v["expression"]), v["expression"])
        for i, v in enumerate(spec.get("validations", []))
    ]
    results = []
    for case in cases:
        request = case["request"]
        activation = {
            "request": celpy.json_to_cel(request),
            "object": celpy.json_to_cel(case.get("object")),
            "oldObject": celpy.json_to_cel(case.get("oldObject")),
        }
        denials = []
        matched = any(rule_matches(r, request) for r in rules)
        # A false condition skips the policy, whatever errors other conditions had.
        errors = []
        for where, program in conditions if matched else []:
            value, error = evaluate(program, activation)
            if error is None and not isinstance(value, celtypes.BoolType):
                error = f"not a bool: {value!r}"
            if error is not None:
                errors.append({"check": where, "message": "match condition failed to evaluate",
                               "error": error})
            elif not value:
                matched = False
                break
        if matched:
            denials.extend(errors)
        if matched and not denials:
            bound = {}
            failed = {}
            for name, program in variables:
                value, error = evaluate(
                    program, {**activation, "variables": celtypes.MapType(bound)}
                )
                if error is None:
                    bound[celtypes.StringType(name)] = value
                else:
                    failed[name] = error
            for where, message, program, expression in validations:
                # Kubernetes evaluates a variable when first used: an error counts only there.
                used = [n for n in failed if f"variables.{n}" in expression]
                if used:
                    denials.append({"check": where, "message": message,
                                    "error": f"variables.{used[0]}: {failed[used[0]]}"})
                    continue
                value, error = evaluate(
                    program, {**activation, "variables": celtypes.MapType(bound)}
                )
                if error is not None:
                    denials.append({"check": where, "message": message, "error": error})
                elif not isinstance(value, celtypes.BoolType):
                    denials.append({"check": where, "message": message,
                                    "error": f"not a bool: {value!r}"})
                elif not value:
                    denials.append({"check": where, "message": message})
        results.append({
            "name": case["name"],
            "matched": matched,
            "allowed": not denials,
            "denials": denials,
        })
    return results


def main():
    data = json.load(sys.stdin)
    json.dump(run(data["policy"], data["binding"], data["cases"]), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
