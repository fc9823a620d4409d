"""The built-in quick-start corpus: synthetic clinical-style notes, non-IID across sites.

Nothing is downloaded. Each site is a hospital department with its own complaints, findings,
medications and plans; 80 % of a site's notes come from its own specialty and 20 % from the
others, so sites differ (non-IID) yet share a common note structure worth learning together.
The public text (`generate_public_records`: what `fedglm pretrain` trains the base on, and what
the coordinator distills on) comes from a general-medicine clinic only: it teaches the note
structure and everyday wording, while each department's vocabulary, findings and treatments are
only in the sites' records, which is what the federation has to learn. The output is a pure
function of its arguments. All notes are fictional.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from fedglm.atomic import atomic_write_text


@dataclass(frozen=True)
class Specialty:
    name: str
    complaints: tuple[str, ...]
    findings: tuple[str, ...]
    medications: tuple[str, ...]
    plans: tuple[str, ...]


SPECIALTIES: tuple[Specialty, ...] = (
    Specialty(
        "cardiology",
        (
            "chest pain on exertion",
            "palpitations",
            "shortness of breath when lying flat",
            "swelling of both ankles",
            "an episode of fainting",
        ),
        (
            "a regular rate and rhythm with a soft systolic murmur",
            "bibasilar crackles",
            "ST depression in the lateral leads",
            "an ejection fraction of 35 percent",
            "atrial fibrillation with a rapid ventricular response",
        ),
        (
            "metoprolol 25 mg twice daily",
            "atorvastatin 40 mg at night",
            "aspirin 81 mg daily",
            "furosemide 40 mg daily",
            "apixaban 5 mg twice daily",
        ),
        (
            "a stress echocardiogram",
            "cardiac catheterization",
            "a Holter monitor for 48 hours",
            "titration of the beta blocker",
            "a low sodium diet and daily weights",
        ),
    ),
    Specialty(
        "orthopedics",
        (
            "right knee pain after a fall",
            "low back pain radiating to the left leg",
            "a painful swollen ankle",
            "shoulder pain with overhead activity",
            "wrist pain after a fall",
        ),
        (
            "tenderness over the medial joint line",
            "a positive straight leg raise on the left",
            "a displaced distal radius fracture",
            "reduced range of motion of the shoulder",
            "a moderate joint effusion",
        ),
        (
            "ibuprofen 600 mg three times daily",
            "acetaminophen 1 g every 8 hours",
            "a short course of oxycodone",
            "topical diclofenac gel",
            "a lidocaine patch",
        ),
        (
            "physical therapy twice weekly",
            "an MRI of the knee",
            "a short arm cast for six weeks",
            "a corticosteroid injection",
            "open reduction and internal fixation",
        ),
    ),
    Specialty(
        "neurology",
        (
            "recurrent headaches with visual aura",
            "numbness of the right hand",
            "a first generalized seizure",
            "worsening tremor at rest",
            "sudden word finding difficulty",
        ),
        (
            "a mild right pronator drift",
            "cogwheel rigidity of the left arm",
            "a normal fundoscopic examination",
            "decreased vibration sense in both feet",
            "an abnormal EEG with left temporal sharp waves",
        ),
        (
            "levetiracetam 500 mg twice daily",
            "sumatriptan 50 mg as needed",
            "carbidopa levodopa 25/100 three times daily",
            "topiramate 25 mg at night",
            "gabapentin 300 mg at night",
        ),
        (
            "an MRI of the brain with contrast",
            "a repeat EEG",
            "a headache diary",
            "nerve conduction studies",
            "a follow-up visit in three months",
        ),
    ),
    Specialty(
        "gastroenterology",
        (
            "epigastric pain after meals",
            "bright red blood per rectum",
            "chronic diarrhea",
            "difficulty swallowing solids",
            "yellowing of the eyes",
        ),
        (
            "mild epigastric tenderness",
            "a nodular liver edge",
            "a hemoglobin of 9.8",
            "elevated liver enzymes",
            "a positive stool test for occult blood",
        ),
        (
            "omeprazole 40 mg daily",
            "mesalamine 1.2 g twice daily",
            "lactulose 20 g twice daily",
            "ondansetron 4 mg as needed",
            "a bowel preparation",
        ),
        (
            "an upper endoscopy",
            "a colonoscopy with biopsies",
            "an abdominal ultrasound",
            "a hepatitis panel",
            "a gluten free diet trial",
        ),
    ),
    Specialty(
        "obstetrics",
        (
            "a routine prenatal visit at 28 weeks",
            "vaginal bleeding in the first trimester",
            "decreased fetal movement",
            "pelvic pressure and contractions",
            "elevated blood pressure in pregnancy",
        ),
        (
            "a fundal height appropriate for dates",
            "a fetal heart rate of 140",
            "a closed long cervix",
            "protein in the urine",
            "a reactive nonstress test",
        ),
        (
            "prenatal vitamins daily",
            "labetalol 200 mg twice daily",
            "ferrous sulfate 325 mg daily",
            "low dose aspirin",
            "Rh immune globulin",
        ),
        (
            "a glucose tolerance test",
            "a growth ultrasound",
            "weekly nonstress tests",
            "labor and delivery precautions",
            "a follow-up visit in two weeks",
        ),
    ),
    Specialty(
        "pulmonology",
        (
            "a chronic productive cough",
            "wheezing at night",
            "worsening dyspnea on exertion",
            "coughing up blood",
            "snoring with daytime sleepiness",
        ),
        (
            "diffuse expiratory wheezes",
            "an oxygen saturation of 89 percent on room air",
            "a right lower lobe infiltrate",
            "an FEV1 of 55 percent predicted",
            "a 2 cm lung nodule",
        ),
        (
            "albuterol inhaler as needed",
            "tiotropium once daily",
            "prednisone 40 mg for five days",
            "azithromycin 250 mg daily",
            "home oxygen at 2 liters",
        ),
        (
            "pulmonary function tests",
            "a CT of the chest",
            "a sleep study",
            "pulmonary rehabilitation",
            "a bronchoscopy",
        ),
    ),
)

GENERAL = Specialty(
    "general medicine",
    (
        "fatigue",
        "a sore throat",
        "a cough for one week",
        "headache",
        "a routine check-up",
    ),
    (
        "normal vital signs",
        "a mildly red throat without exudate",
        "clear lungs on auscultation",
        "a soft and non-tender abdomen",
        "no focal neurological deficit",
    ),
    (
        "paracetamol 500 mg as needed",
        "ibuprofen 400 mg with food",
        "vitamin D 1000 units daily",
        "a saline nasal spray",
        "no new medication",
    ),
    (
        "routine blood tests",
        "rest and fluids",
        "a follow-up visit in two weeks",
        "advice on sleep and exercise",
        "a flu vaccination",
    ),
)

_OPENINGS = (
    "CHIEF COMPLAINT: {complaint}.",
    "REASON FOR VISIT: {complaint}.",
    "HISTORY OF PRESENT ILLNESS: The patient presents with {complaint}.",
)
_SEXES = ("male", "female")


def generate_note(specialty: Specialty, rng: random.Random) -> str:
    """One fictional note of `specialty`, drawn from `rng`."""
    age = rng.randint(18, 92)
    sex = rng.choice(_SEXES)
    complaint = rng.choice(specialty.complaints)
    lines = [
        f"SPECIALTY: {specialty.name.title()}",
        rng.choice(_OPENINGS).format(complaint=complaint),
        f"This is a {age}-year-old {sex} with {rng.randint(1, 14)} days of {complaint}.",
        f"EXAMINATION: The examination shows {rng.choice(specialty.findings)}.",
        f"Further evaluation shows {rng.choice(specialty.findings)}.",
        f"MEDICATIONS: {rng.choice(specialty.medications)} and {rng.choice(specialty.medications)}.",
        f"ASSESSMENT AND PLAN: We will arrange {rng.choice(specialty.plans)} and "
        f"{rng.choice(specialty.plans)}. The patient agrees with the plan.",
    ]
    return "\n".join(lines)


def generate_site_records(site: int, records: int, seed: int) -> list[str]:
    """Notes of site `site`: 80 % from its own specialty, 20 % from the others."""
    rng = random.Random(f"fedglm-corpus/{seed}/{site}")
    home = SPECIALTIES[site % len(SPECIALTIES)]
    notes = []
    for _ in range(records):
        specialty = home if rng.random() < 0.8 else rng.choice(SPECIALTIES)
        notes.append(generate_note(specialty, rng))
    return notes


def write_generated_corpus(out_dir: Path, *, sites: int, records_per_site: int, seed: int) -> list[Path]:
    """Write one JSONL file (field `text`) per site; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for site in range(sites):
        path = out_dir / f"site-{site + 1}.jsonl"
        lines = (json.dumps({"text": t}) for t in generate_site_records(site, records_per_site, seed))
        atomic_write_text(path, "\n".join(lines) + "\n")
        paths.append(path)
    return paths


def generate_public_records(records: int, seed: int) -> list[str]:
    """Public text for the coordinator (pretraining, distillation, held-out checks): notes of
    the general-medicine clinic, from a stream that no site's records are drawn from."""
    rng = random.Random(f"fedglm-corpus/{seed}/public")
    return [generate_note(GENERAL, rng) for _ in range(records)]
